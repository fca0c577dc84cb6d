"""heap_trim: freed heap memory returned after a call that grew the resident set (issue 18's RSS target)."""
import sys

import pytest

from anemll_fast import heap_trim

pytestmark = pytest.mark.skipif(heap_trim._LIBC is None, reason="glibc's malloc_trim (Linux only)")


def _fragment(mb: int):
    # Blocks below glibc's mmap threshold land in the heap; keeping every 16th pins the heap so that the
    # freed ones between them cannot go back by themselves.
    blocks = [bytearray(b"\1") * (64 << 10) for _ in range(mb * 16)]
    return blocks[::16]


def test_a_grown_resident_set_is_trimmed_and_a_steady_one_is_not(monkeypatch):
    monkeypatch.setattr(heap_trim, "_baseline", 0)
    assert heap_trim.trim_if_grown() is False  # the first look sets the baseline
    assert heap_trim.trim_if_grown() is False  # nothing grew
    keep = _fragment(96)
    grown = heap_trim.resident_bytes()
    assert grown > heap_trim._baseline + heap_trim.TRIM_ABOVE  # negative control: freeing alone kept it
    assert heap_trim.trim_if_grown() is True
    assert heap_trim.resident_bytes() < grown - (48 << 20)
    assert heap_trim.trim_if_grown() is False  # the new baseline is what the trim left
    del keep


def test_growth_below_the_threshold_does_not_trim(monkeypatch):
    monkeypatch.setattr(heap_trim, "_baseline", 0)
    heap_trim.trim_if_grown()
    keep = _fragment(96)
    assert heap_trim.trim_if_grown(threshold=1 << 40) is False
    del keep


def test_resident_bytes_reads_the_process():
    assert 10 << 20 < heap_trim.resident_bytes() < 64 << 30
    assert sys.platform.startswith("linux")
