"""The sha256 of output files, remembered per process (`output_manifest.sha256_of`): a change is never hidden by the
memory, even where file times are coarse, and a settled file is read once.

Linux 6.13+ gives fine change times to files whose times were looked at, so a same-size write right after a read shows
here anyway. Older kernels, ext3 (1 s), FAT (2 s) and many network file systems keep the times of a clock tick, so the
tests give `sha256_of` a file system of coarse times: every time it sees is cut to whole seconds.
"""

from __future__ import annotations

import hashlib
import os
import time
from types import SimpleNamespace

import pytest

from g2vlm_hf import output_manifest
from g2vlm_hf.output_manifest import sha256_of

TICK_NS = 1_000_000_000


class CoarseTimes:
    """`os` as `output_manifest` uses it, with file times cut to `TICK_NS`, and `shift_ns` added to them."""

    def __init__(self, shift_ns: int = 0):
        self.shift_ns = shift_ns

    def _coarse(self, info: os.stat_result) -> SimpleNamespace:
        def cut(ns: int) -> int:
            return ns // TICK_NS * TICK_NS + self.shift_ns

        return SimpleNamespace(
            st_dev=info.st_dev, st_ino=info.st_ino, st_size=info.st_size, st_mode=info.st_mode,
            st_mtime_ns=cut(info.st_mtime_ns), st_ctime_ns=cut(info.st_ctime_ns),
        )  # fmt: skip

    def fstat(self, descriptor: int) -> SimpleNamespace:
        return self._coarse(os.fstat(descriptor))

    def stat(self, path, **kwargs) -> SimpleNamespace:
        return self._coarse(os.stat(path, **kwargs))

    def __getattr__(self, name: str):
        return getattr(os, name)


@pytest.fixture
def coarse_times(monkeypatch) -> CoarseTimes:
    times = CoarseTimes()
    monkeypatch.setattr(output_manifest, "os", times)
    monkeypatch.setattr(output_manifest, "_HASHED", {})
    return times


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_same_size_write_right_after_a_read_is_seen_with_coarse_file_times(tmp_path, coarse_times):
    # both writes fall in the same tick (or in two: the times differ then anyway), so the key alone cannot tell them
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"ours" * 256)
    assert sha256_of(path) == digest(b"ours" * 256)
    path.write_bytes(b"edit" * 256)
    assert sha256_of(path) == digest(b"edit" * 256)


def test_a_file_that_changed_long_before_the_read_is_read_once(tmp_path, coarse_times, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"ours" * 256)
    coarse_times.shift_ns = -60 * TICK_NS  # written a minute ago
    expected = digest(b"ours" * 256)
    opened = []
    real_open = open

    def counted_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    reads = []
    real_sha256 = hashlib.sha256

    def counted_sha256(*args):
        reads.append(1)
        return real_sha256(*args)

    monkeypatch.setattr(output_manifest.hashlib, "sha256", counted_sha256)
    monkeypatch.setattr("builtins.open", counted_open)
    assert sha256_of(path) == sha256_of(path) == expected
    assert len(reads) == 1 and len(opened) == 2  # opened for its identity each time, its bytes hashed once


def test_a_settled_file_written_again_is_hashed_again(tmp_path, coarse_times):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"ours" * 256)
    coarse_times.shift_ns = -60 * TICK_NS
    assert sha256_of(path) == digest(b"ours" * 256)
    # a write now gives the file a change time of now: a new key, whatever the clock's tick
    coarse_times.shift_ns = 0
    time.sleep(0.01)
    path.write_bytes(b"edit" * 256)
    assert sha256_of(path) == digest(b"edit" * 256)
