"""Model directories other processes must read: written with the umask's modes, checked before loading.

WHY modes are set explicitly: safetensors writes every file through a temporary file and a rename
(its atomic writer), and a temporary file is created mode 0600; `tempfile.mkdtemp`, which our own
atomic directory writes use, creates 0700. Published weights, checkpoints and the demo's models
would then be readable by their writer only, and an SGLang server, a container running as another
user or a colleague could not load them. Files get `0666 & ~umask` and directories `0777 & ~umask`,
what an ordinary `open()`/`mkdir()` would have given (0644 / 0755 under the usual umask 022), so a
restrictive umask (077) is still honoured.

WHY a check before loading: transformers and safetensors report an unreadable weights file as
"No such file or directory", which sends a user looking for a file that is there. `check_model_dir`
opens every file of the directory first and names the one that fails with the real OS error.

Config path fields are `UserPath`: `~` and `$VAR` expand as they would in a shell.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator


def expand_path(value: str) -> str:
    """`~`, `~user` and `$VAR` / `${VAR}` expanded, as a shell would have (a URL is left alone).

    WHY: a YAML file or `--set` value is not seen by a shell, so `actor.model_dir: ~/models/student`
    would otherwise be a directory literally named `~`, reported missing.
    """
    if not value or "://" in value:
        return value
    return os.path.expandvars(os.path.expanduser(value))


UserPath = Annotated[str, AfterValidator(expand_path)]
"""A path field of the config tree: `~` and environment variables expanded at validation."""


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What `open(path, "w")` gives a new file: 0666 & ~umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """What `mkdir` gives a new directory: 0777 & ~umask."""
    return 0o777 & ~current_umask()


def apply_default_modes(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the modes a plain write would have (see module docs)."""
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    root = Path(root)
    if root.is_file():
        os.chmod(root, file_mode)
        return
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def check_model_dir(path: str | os.PathLike[str], key: str) -> Path:
    """`path` as a readable Hugging Face model directory, or an OSError naming `key` and the real cause.

    Missing or not a directory: FileNotFoundError / NotADirectoryError. No config.json:
    FileNotFoundError. A file or the directory this process may not read: PermissionError naming
    that file, its mode and owner, and this process's uid. A `*.safetensors` file that is truncated
    or not safetensors at all: ValueError naming it (`check_safetensors`).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}: {p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"{key}: {p} is not a directory")
    try:
        entries = sorted(p.iterdir())
    except PermissionError as exc:
        raise _denied(key, p, exc) from None
    for entry in entries:
        if entry.is_file():
            try:
                with open(entry, "rb"):
                    pass
            except PermissionError as exc:
                raise _denied(key, entry, exc) from None
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {p} has no config.json (not a Hugging Face model directory)")
    for entry in entries:
        if entry.suffix == ".safetensors" and entry.is_file():
            check_safetensors(entry, key)
    return p


def check_safetensors(path: Path, key: str) -> None:
    """A ValueError naming `key` and `path` unless its header parses and the file holds every byte it names.

    WHY: transformers reports a damaged weights file with a deep traceback ending in "SafetensorError:
    invalid header length"; this reads only the header (8-byte length + JSON), so it costs nothing per load.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"{key}: {path} is not a readable safetensors file ({exc}); replace it with a good copy") \
            from None
    if 8 + n + max(ends, default=0) > size:
        raise ValueError(f"{key}: {path} is truncated: its header names {8 + n + max(ends)} bytes, the file has {size}; "
                         "replace it with a good copy")


def _denied(key: str, path: Path, exc: PermissionError) -> PermissionError:
    try:
        st = path.stat()
        who = f"mode {st.st_mode & 0o777:04o}, owner uid {st.st_uid}"
    except OSError:
        who = "mode unknown"
    getuid = getattr(os, "getuid", None)
    me = f"; this process runs as uid {getuid()}" if getuid else ""
    return PermissionError(f"{key}: cannot read {path}: {exc.strerror or exc} ({who}{me}); make the model "
                           f"files readable to this user (e.g. chmod -R a+rX {path.parent if path.is_file() else path})")


DISK_FULL = "disk_full"
IO_ERROR = "io_error"
WRITE_ERROR_REASONS = (DISK_FULL, IO_ERROR, "other")
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_RUST_OS_ERROR = re.compile(r"os error (\d+)")


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory by its path; a directory's fsync makes the creations and renames in it
    durable. Errors propagate: each caller knows which it may ignore (a file zarr deleted, a platform
    without directory fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error_reason(exc: BaseException) -> str:
    """Why a write failed, as a metric label: `disk_full` (ENOSPC, EDQUOT), `io_error` (any other OS
    error) or `other`.

    WHY the chain and the message are searched: the error that reaches a role is often a wrapper
    (safetensors raises `SafetensorError("... No space left on device (os error 28)")`, not an OSError;
    our own errors are raised `from` the OSError), and a full disk must be told apart from a bug.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = cur.errno if isinstance(cur, OSError) else None
        if code is None:
            match = _RUST_OS_ERROR.search(str(cur))
            code = int(match.group(1)) if match else None
        if code is not None:
            return DISK_FULL if code in _DISK_FULL_ERRNOS else IO_ERROR
        if isinstance(cur, OSError) and cur.__cause__ is None and cur.__context__ is None:
            return IO_ERROR
        cur = cur.__cause__ or cur.__context__
    return "other"
