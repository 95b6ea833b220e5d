"""Readers share the lock, a writer has it alone, and a waiting writer is not starved."""

from __future__ import annotations

import threading
import time

import pytest

from services.serving.rwlock import ReadWriteLock

pytestmark = pytest.mark.unit


def test_readers_share_writer_excludes_and_is_not_starved() -> None:
    lock = ReadWriteLock()
    inside = {"readers": 0, "max_readers": 0, "writer_saw_readers": -1}
    guard = threading.Lock()
    both_in = threading.Barrier(2, timeout=5)

    def reader(hold: float, meet: bool) -> None:
        with lock.read():
            with guard:
                inside["readers"] += 1
                inside["max_readers"] = max(inside["max_readers"], inside["readers"])
            if meet:
                both_in.wait()  # two readers inside at the same time, or this times out
            time.sleep(hold)
            with guard:
                inside["readers"] -= 1

    def writer() -> None:
        with lock.write():
            with guard:
                inside["writer_saw_readers"] = inside["readers"]

    first = [threading.Thread(target=reader, args=(0.2, True)) for _ in range(2)]
    for t in first:
        t.start()
    time.sleep(0.05)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.05)
    late_entered = threading.Event()

    def late_reader() -> None:
        with lock.read():
            late_entered.set()

    late = threading.Thread(target=late_reader)
    late.start()
    time.sleep(0.05)
    assert not late_entered.is_set()  # held back: a writer is waiting
    for t in [*first, w, late]:
        t.join(timeout=5)
    assert inside["max_readers"] == 2
    assert inside["writer_saw_readers"] == 0
    assert late_entered.is_set()
