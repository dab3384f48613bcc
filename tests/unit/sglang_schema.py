"""SGLang's own request and response schema, read from its released wheel (downloaded, never installed).

Used by `test_sglang_contract.py`. SGLang pins a torch and transformers this project cannot share an
interpreter with, so nothing of it is installed: `fetch_sources` downloads exactly the wheel pinned in
`protocol/sglang_version.py` (`pip download --no-deps`, sha256 checked) into a cache folder and extracts the
few source files that define the HTTP contract. Two ways of reading them:

- `sglang/api/v1/api_types.py` (generated from SGLang's proto schema; needs only `msgspec`) is imported
  from its file and *run*: `GenerateRequest.from_json_value` is the gate `/generate` applies to every body
  (`api_contract.generate_contract_error`, HTTP 400 on failure), and its response decoders parse answers.
  `msgspec` is imported if present, else its wheel is downloaded the same way (`ensure_msgspec`).
- the server-side definitions (`io_struct.py`, `sampling_params.py`, `http_server.py`, ...) import torch
  and the rest of SGLang, so they are parsed with `ast`, never imported: field names and defaults of the
  request structs, the routes and the body class each takes, the keys of the dicts a handler answers.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from protocol.sglang_version import SGLANG_VERSION, SGLANG_WHEEL, SGLANG_WHEEL_SHA256

MSGSPEC_VERSION = "0.23.0"  # only to run api_types.py where msgspec is not installed

SOURCES = {
    "api_types": "sglang/api/v1/api_types.py",
    "api_contract": "sglang/srt/entrypoints/api_contract.py",
    "io_struct": "sglang/srt/managers/io_struct.py",
    "sampling_params": "sglang/srt/sampling/sampling_params.py",
    "http_server": "sglang/srt/entrypoints/http_server.py",
    "serving_args": "sglang/srt/arg_groups/fields/serving.py",
}


class FetchError(RuntimeError):
    """The wheel could not be had (no network, no such version, a changed file): the reason, for a skip."""


def _pip_download(requirement: str, dest: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), "--quiet", "--disable-pip-version-check", *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"pip download {requirement}: {exc}") from exc
    if done.returncode != 0:
        text = done.stderr or done.stdout
        errors = [line.strip() for line in text.splitlines() if line.startswith("ERROR")]
        reason = " ".join(errors) if errors else " ".join(text.split())[-400:]
        raise FetchError(f"pip download {requirement} failed (exit {done.returncode}): {reason}")


def fetch_sources(cache: Path) -> Path:
    """The extracted contract sources of the pinned SGLang under `cache` (downloaded once, then reused)."""
    target = cache / f"sglang-{SGLANG_VERSION}"
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # The schema files are plain Python: one fixed platform's wheel serves every host.
        _pip_download(f"sglang=={SGLANG_VERSION}", Path(tmp), "--platform", "manylinux_2_34_x86_64",
                      "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")
        wheel = Path(tmp) / SGLANG_WHEEL
        if not wheel.is_file():
            raise FetchError(f"pip download did not produce {SGLANG_WHEEL} (got {sorted(p.name for p in Path(tmp).iterdir())})")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SGLANG_WHEEL_SHA256:
            raise FetchError(f"{SGLANG_WHEEL}: sha256 {digest}, expected {SGLANG_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            for member in SOURCES.values():
                out = target / member
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(member))
    (target / ".complete").touch()
    return target


def ensure_msgspec(cache: Path) -> None:
    """Make `import msgspec` work: as installed, or from its wheel extracted under `cache` (put on sys.path)."""
    try:
        import msgspec  # noqa: F401
    except ImportError:
        pass
    else:
        return
    target = cache / f"msgspec-{MSGSPEC_VERSION}-{sys.implementation.cache_tag}"
    if not (target / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _pip_download(f"msgspec=={MSGSPEC_VERSION}", Path(tmp))  # this interpreter's wheel
            wheels = list(Path(tmp).glob("msgspec-*.whl"))
            if len(wheels) != 1:
                raise FetchError(f"pip download msgspec=={MSGSPEC_VERSION} gave {wheels}")
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(target)
        (target / ".complete").touch()
    sys.path.insert(0, str(target))


def load_api_types(root: Path) -> ModuleType:
    """SGLang's generated `api_types.py`, imported from its file under a private module name."""
    name = f"_sglang_{SGLANG_VERSION.replace('.', '_')}_api_types"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / SOURCES["api_types"])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- ast readers


@dataclass(frozen=True)
class Field:
    name: str
    required: bool  # no default
    annotation: str  # as written in the source


def parse(root: Path, key: str) -> ast.Module:
    return ast.parse((root / SOURCES[key]).read_text(), filename=SOURCES[key])


def class_fields(tree: ast.Module, name: str) -> dict[str, Field]:
    """Annotated fields of class `name` and of its bases defined in the same module (bases first)."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    if name not in classes:
        raise KeyError(f"class {name} not found")
    fields: dict[str, Field] = {}
    for base in classes[name].bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields.update(class_fields(tree, base.id))
    for stmt in classes[name].body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            annotation = ast.unparse(stmt.annotation)
            if not annotation.startswith("ClassVar"):
                fields[stmt.target.id] = Field(stmt.target.id, stmt.value is None, annotation)
    return fields


def literal_values(annotation: str) -> set[str]:
    """The string values of a `Literal[...]` annotation."""
    node = ast.parse(annotation, mode="eval").body
    if not (isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal"):
        raise ValueError(f"not a Literal: {annotation}")
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    return {item.value for item in items if isinstance(item, ast.Constant)}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: ast.AsyncFunctionDef | ast.FunctionDef
    body_class: str | None  # the struct FastAPI parses the JSON body into


def routes(tree: ast.Module) -> dict[tuple[str, str], Route]:
    """`(METHOD, path) -> Route` for every `@app.get/post/api_route` handler of `http_server.py`."""
    out: dict[tuple[str, str], Route] = {}
    for node in tree.body:
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                    and ast.unparse(deco.func.value) == "app" and deco.args
                    and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                continue
            kind = deco.func.attr
            if kind == "api_route":
                methods = next((ast.literal_eval(k.value) for k in deco.keywords if k.arg == "methods"), ["GET"])
            elif kind in ("get", "post", "put", "delete"):
                methods = [kind.upper()]
            else:
                continue
            for method in methods:
                out[(method, deco.args[0].value)] = Route(method, deco.args[0].value, node, _body_class(node))
    return out


def _body_class(handler: ast.AsyncFunctionDef | ast.FunctionDef) -> str | None:
    for arg in handler.args.args:
        ann = arg.annotation
        if ann is None:
            continue
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
            ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
        if isinstance(ann, ast.Name) and ann.id not in ("Request", "Response"):
            return ann.id
    return None


def dict_keys(func: ast.AST) -> set[str]:
    """Every string key of a dict literal inside `func` (what a handler answers)."""
    return {key.value for node in ast.walk(func) if isinstance(node, ast.Dict)
            for key in node.keys if isinstance(key, ast.Constant) and isinstance(key.value, str)}


def calls(func: ast.AST) -> set[str]:
    """The dotted names `func` calls (`GenerateRequest.from_json_value`, `generate_contract_error`, ...)."""
    return {ast.unparse(node.func) for node in ast.walk(func) if isinstance(node, ast.Call)}


def string_default(tree: ast.Module, field: str) -> str:
    """The default of the annotated field `field` of any class in `tree` (a string constant)."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == field
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise KeyError(f"no string default for {field}")
