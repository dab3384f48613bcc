"""`protocol/files.fsync_path`, the one fsync of the cache root (`fsync_keys`) and the model dirs (`fsync_dir`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cache.root import CacheRoot
from learner.modeldirs import fsync_dir
from protocol.files import fsync_path


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fsync_path_files_and_dirs_without_leaking_descriptors(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    before = _open_fds()
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        fsync_path(tmp_path / "gone")
    assert err.value.filename == str(tmp_path / "gone")
    assert _open_fds() == before
    fsync_dir(tmp_path / "gone")  # a model dir's fsync ignores what the platform refuses


def test_cache_root_fsyncs_written_keys_and_skips_deleted_chunks(tmp_path: Path) -> None:
    root = CacheRoot(tmp_path / "cache", create=True)
    assert root.local is not None
    (root.local / "a").mkdir()
    (root.local / "a" / "0").write_bytes(b"x")
    before = _open_fds()
    root.fsync_keys(["a/0", "a/1", "b/0"])  # a/1: zarr deleted a fill-value chunk; b: never made
    assert _open_fds() == before
