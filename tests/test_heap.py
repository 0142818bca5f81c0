"""Giving the C heap's free pages back (streaming_tts/heap.py)."""

import pytest

from streaming_tts import heap


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not heap.available(), reason="not glibc: malloc_trim does not exist")
def test_freed_heap_memory_goes_back_to_the_system():
    # 128 MiB in 64 KiB blocks (below glibc's mmap threshold, so on the heap); the last one kept
    # alive pins the top of the heap, so glibc cannot shrink it on its own.
    blocks = [bytearray(64 * 1024) for _ in range(2048)]
    keep = blocks[-1]
    del blocks
    before = rss_mb()
    assert heap.release_free_heap() is True
    assert before - rss_mb() > 100, "the freed 128 MiB should leave the resident set"
    assert len(keep) == 64 * 1024


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.available() is False
    assert heap.release_free_heap() is False
