"""The Zarr root of a teacher cache: open or create it, list, size and delete shards, fsync, writer locks.

Why one writer per shard: zarr-python has no cross-process locking, and two processes writing the
same chunk (or resizing the same array) lose each other's data. So every writer process owns
`shards/<writer_id>/` (guarded by an flock on local roots, `acquire_writer_lock`) and only ever appends
to its own arrays (`cache.shards`). The layout and names are in `cache.layout`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync as zarr_sync
from zarr.errors import ContainsGroupError

from cache.layout import (
    FORMAT_VERSION,
    LOCKS,
    ROOT_FORMAT,
    SHARDS,
    WRITER_ID_PATTERN,
    CacheError,
    validate_writer_id,
)
from protocol.files import fsync_path


async def _collect(it: AsyncIterator[str]) -> list[str]:
    return [x async for x in it]


class WriterLock:
    """An exclusive flock on `<root>/locks/<writer_id>.lock`; the kernel drops it when the process dies."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class CacheRoot:
    """The Zarr root of a cache: opens (or creates) it, lists, opens, sizes and deletes shards.

    Local directories get extras that object stores cannot offer: fsync of written chunk files and
    per-writer flocks. fsspec URLs work through zarr's FsspecStore without them.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool, storage_options: dict[str, Any] | None = None) -> None:
        url = os.fspath(root)
        if not url:
            raise ValueError("cache root must be a non-empty path or URL")
        self.url = url
        self.local: Path | None
        if "://" in url and not url.startswith("file://"):
            self.local = None
            self.store: Any = zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=False)
        else:
            self.local = Path(url.removeprefix("file://")).resolve()
            if not create and not (self.local / "zarr.json").exists():
                raise FileNotFoundError(f"no teacher cache at {self.local} (missing zarr.json)")
            self.store = zarr.storage.LocalStore(self.local)
        if create:
            self.group = self.require_group("", {"format": ROOT_FORMAT, "version": FORMAT_VERSION})
        else:
            try:
                self.group = zarr.open_group(self.store, mode="r+")
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"no teacher cache at {url}") from exc
        if self.group.attrs.get("format") != ROOT_FORMAT:
            raise ValueError(f"{url} is a zarr group but not a teacher cache (attrs {dict(self.group.attrs)})")

    def require_group(self, path: str, attributes: dict[str, Any] | None = None) -> zarr.Group:
        """Open or create a group; tolerant of another process creating it at the same moment."""
        try:
            return zarr.open_group(self.store, path=path, mode="r+")
        except FileNotFoundError:
            pass
        try:
            return zarr.create_group(self.store, path=path, attributes=attributes or {})
        except ContainsGroupError:
            return zarr.open_group(self.store, path=path, mode="r+")

    # -- listing ---------------------------------------------------------------------------------

    def list_dir(self, prefix: str) -> list[str]:
        """Names directly under `prefix` in the store, sorted."""
        return sorted(zarr_sync(_collect(self.store.list_dir(prefix))))

    def list_writers(self) -> list[str]:
        return [w for w in self.list_dir(SHARDS) if WRITER_ID_PATTERN.match(w)]

    def list_shards(self, writer_id: str | None = None) -> list[str]:
        """Shard ids (`writer/seq-uid`), in creation order per writer."""
        writers = [writer_id] if writer_id is not None else self.list_writers()
        out: list[str] = []
        for w in writers:
            out += [f"{w}/{s}" for s in self.list_dir(f"{SHARDS}/{w}") if s[:1].isdigit()]
        return out

    def shard_path(self, shard_id: str) -> str:
        return f"{SHARDS}/{shard_id}"

    def shard_exists(self, shard_id: str) -> bool:
        return bool(zarr_sync(self.store.exists(f"{self.shard_path(shard_id)}/zarr.json")))

    def shard_nbytes(self, shard_id: str) -> int:
        """Bytes the shard's files take (file sizes), metadata included."""
        if self.local is not None:
            total = 0
            for dirpath, _dirs, files in os.walk(self.local / self.shard_path(shard_id)):
                for f in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(os.path.join(dirpath, f)).st_size
            return total
        return int(zarr_sync(self.store.getsize_prefix(self.shard_path(shard_id))))

    def delete_shard(self, shard_id: str) -> None:
        if self.local is not None:
            shutil.rmtree(self.local / self.shard_path(shard_id), ignore_errors=True)
        else:
            zarr_sync(self.store.delete_dir(self.shard_path(shard_id)))

    # -- durability and locks (local roots) ----------------------------------------------------

    def fsync_keys(self, keys: Iterable[str]) -> None:
        """fsync written files and their directories (renames are durable only once the dir is)."""
        if self.local is None:
            return
        files = [self.local / key for key in keys]
        for path in [*files, *{f.parent for f in files}]:  # the files first, then their directories
            with contextlib.suppress(FileNotFoundError):  # zarr deletes chunks equal to the fill value
                fsync_path(path)

    def acquire_writer_lock(self, writer_id: str, timeout_s: float) -> WriterLock | None:
        """Lock `writer_id` for this process (None on non-local roots, which cannot flock).

        Raises CacheError if another live process holds it past `timeout_s`.
        """
        if self.local is None:
            return None
        path = self.local / LOCKS / f"{validate_writer_id(writer_id)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return WriterLock(path, fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise CacheError(
                        f"writer_id {writer_id!r} is held by another live process ({path}); "
                        "every writer process needs its own writer_id"
                    ) from None
                time.sleep(0.05)

