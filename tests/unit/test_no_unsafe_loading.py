"""Nothing in the product deserializes untrusted bytes into code, and every model load asks for safetensors (issue 11).

Why: a pickle (``pickle.load``, ``torch.load`` without ``weights_only``, ``numpy.load(allow_pickle=True)``,
``joblib``, ``dill``), a ``yaml.load`` without the safe loader, or ``eval``/``exec`` runs whatever code the
bytes carry. Queues carry msgpack (protocol/codec.py), checkpoints and published weights are safetensors
plus JSON (learner/statetree.py), configs are ``yaml.safe_load``. ``from_pretrained`` of a model is given
``use_safetensors=True``: a model directory holding only a pickled ``pytorch_model.bin`` is refused
instead of unpickled (tokenizers and configs are JSON and take no such flag). ``trust_remote_code=True``
(running a model repository's Python) is refused everywhere.

An AST scan of every product package (by import-resolved names, so ``import numpy as np`` or ``from pickle
import loads`` do not hide a call); the scan itself is checked against a file of every pattern it must
catch, so this test cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "actors", "cache", "learner", "opd", "bench", "scripts")
PICKLE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle")
NOT_A_MODEL = ("Tokenizer", "TokenizerFast", "Config", "Processor", "FeatureExtractor", "ImageProcessor")
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader")
JUSTIFIED = "# trusted:"  # the comment a torch.load(weights_only=True) line needs: why these bytes are trusted


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> what it refers to: ``np`` -> ``numpy``, ``loads`` -> ``pickle.loads``."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load``; None for calls on anything but a (dotted) name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _check_call(call: ast.Call, name: str, line: str) -> str | None:
    """Why ``call`` (to the resolved ``name``) is unsafe, or None."""
    module, _, attr = name.rpartition(".")
    if module.split(".")[0] in PICKLE_MODULES:
        return f"{name}: pickle-family deserialization runs code carried by the bytes"
    if attr == "read_pickle":
        return f"{name}: unpickles"
    if name == "torch.load" and not (_is_true(_kw(call, "weights_only")) and JUSTIFIED in line):
        return f"torch.load is pickle: use safetensors (or weights_only=True with a '{JUSTIFIED}' comment)"
    allow_pickle = _kw(call, "allow_pickle")
    if name == "numpy.load" and not (allow_pickle is None or (isinstance(allow_pickle, ast.Constant)
                                                              and allow_pickle.value is False)):
        return "numpy.load with allow_pickle unpickles object arrays"
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
        return f"{name} can build arbitrary objects: use yaml.safe_load"
    if name in ("yaml.load", "yaml.load_all"):
        loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        loader_name = ast.unparse(loader) if loader is not None else ""
        if not loader_name.endswith(SAFE_YAML_LOADERS):
            return f"{name} without Loader=yaml.SafeLoader: use yaml.safe_load"
    if name in ("eval", "exec"):
        return f"builtin {name}() runs code"
    if _is_true(_kw(call, "trust_remote_code")):
        return "trust_remote_code=True runs a model repository's Python"
    if attr == "from_pretrained":
        receiver = module.rsplit(".", 1)[-1]
        # gguf_file=: the weights come from that GGUF file (tensors and metadata, no pickle), nothing else.
        if not receiver.endswith(NOT_A_MODEL) and not _is_true(_kw(call, "use_safetensors")) \
                and _kw(call, "gguf_file") is None:
            return f"{receiver}.from_pretrained without use_safetensors=True may unpickle a pytorch_model.bin"
    return None


def scan(source: str, path: str = "<source>") -> list[str]:
    """Every unsafe load in ``source``, as ``path:line: why``."""
    tree = ast.parse(source, filename=path)
    aliases = _aliases(tree)
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = [m for m in modules if m.split(".")[0] in PICKLE_MODULES]
            if bad:
                found.append(f"{path}:{node.lineno}: imports {bad[0]} (a pickle-family deserializer)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            why = _check_call(node, name, lines[node.lineno - 1]) if name else None
            if why:
                found.append(f"{path}:{node.lineno}: {why}")
    return found


def product_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) if "__pycache__" not in p.parts]
    assert len(files) > 50, f"the scan found only {len(files)} files under {PACKAGES}: wrong root?"
    return files


def test_no_product_module_loads_untrusted_bytes_unsafely() -> None:
    found = [f for p in product_files() for f in scan(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, "unsafe deserialization in the product:\n" + "\n".join(found)


def test_every_model_from_pretrained_asks_for_safetensors() -> None:
    """The scan above covers it; this pins that there are such calls to check (the scan sees them)."""
    calls = 0
    for p in product_files():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "from_pretrained" and "ForCausalLM" in ast.unparse(node.func):
                calls += 1
                assert _is_true(_kw(node, "use_safetensors")) or _kw(node, "gguf_file") is not None, \
                    f"{p}:{node.lineno}: {ast.unparse(node)}"
    assert calls >= 5, calls


BAD = '''
import pickle
import numpy as np
import torch
import yaml
from dill import loads as dl
from transformers import AutoModelForCausalLM, AutoTokenizer
pickle.loads(b"")
dl(b"")
torch.load("x.pt")
torch.load("x.pt", weights_only=True)
np.load("x.npy", allow_pickle=True)
yaml.load(open("c.yaml"))
yaml.load(open("c.yaml"), Loader=yaml.Loader)
yaml.unsafe_load("a: 1")
eval("1 + 1")
exec("x = 1")
AutoModelForCausalLM.from_pretrained("m")
AutoModelForCausalLM.from_pretrained("m", use_safetensors=False)
AutoTokenizer.from_pretrained("m", trust_remote_code=True)
'''

GOOD = '''
import numpy as np
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
np.load("x.npy")
np.load("x.npy", allow_pickle=False)
torch.load("x.pt", weights_only=True)  # trusted: written by this process a line above
yaml.safe_load("a: 1")
yaml.load("a: 1", Loader=yaml.SafeLoader)
AutoModelForCausalLM.from_pretrained("m", use_safetensors=True, dtype=torch.float32)
AutoTokenizer.from_pretrained("m")
AutoConfig.from_pretrained("m")
client.eval("return 1", 0)
model.eval()
'''


def test_the_scan_catches_every_pattern_and_passes_safe_ones() -> None:
    found = scan(BAD)
    lines = sorted({int(f.split(":")[1]) for f in found})
    expected = [2, 6, *range(8, 21)]  # the imports of pickle and dill, then every call
    assert lines == expected, "\n".join(found)
    assert scan(GOOD) == []


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_tiny_and_shipped_models_are_safetensors_only(tiny_assets: Path, role: str) -> None:
    for model_dir in (tiny_assets / role, REPO / "models" / "task" / role):
        files = {p.name for p in model_dir.iterdir()}
        assert "model.safetensors" in files, (model_dir, files)
        pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
        assert not pickled, (model_dir, pickled)


def test_a_pickled_only_model_dir_is_refused_not_unpickled(tiny_assets: Path, tmp_path: Path) -> None:
    """What use_safetensors=True buys: a directory with only pytorch_model.bin fails to load."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = tiny_assets / "student"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), tmp_path / "pytorch_model.bin")  # a pickle
    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
