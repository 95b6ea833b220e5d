"""The serve parent's worker replacement: immediate for a worker that dies, paced for a crash loop."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from services.serving.prefork import Prefork

pytestmark = pytest.mark.unit


def _parent(worker) -> Prefork:  # type: ignore[no-untyped-def]
    return Prefork(1, builder=None, current=lambda: None, worker=worker)  # type: ignore[arg-type]


def _run(p: Prefork, sock: socket.socket, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        p._reap(sock)
        time.sleep(0.02)


def test_workers_that_die_at_start_are_replaced_with_a_growing_pause(caplog) -> None:
    """A worker that cannot start (CI: killed on its first threaded call) must not be re-forked
    as fast as it dies: after three early deaths the parent waits 2, 4, 8 … s and logs an error."""
    forks: list[float] = []
    p = _parent(lambda _snap, _sock: os._exit(3))
    real_fork = p._fork
    p._fork = lambda sock: forks.append(time.monotonic()) or real_fork(sock)  # type: ignore[method-assign]
    with socket.socket() as sock, caplog.at_level(logging.WARNING):
        p.pids = {p._fork(sock)}
        _run(p, sock, 5.0)
        p.stopping = True
        p._retire(p.pids)
    # three quick replacements, then one after 2 s (the next would be 4 s later)
    assert 3 <= len(forks) <= 5, [round(t - forks[0], 2) for t in forks]
    assert forks[-1] - forks[0] >= 2.0
    assert any("in a row" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_a_worker_that_dies_after_serving_is_replaced_at_once() -> None:
    p = _parent(lambda _snap, _sock: (time.sleep(60), os._exit(0)))
    with socket.socket() as sock:
        p.pids = {p._fork(sock)}
        p.born = dict.fromkeys(p.pids, time.monotonic() - 3600)  # it has served for an hour
        first = next(iter(p.pids))
        os.kill(first, 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (first in p.pids or not p.pids):
            p._reap(sock)
            time.sleep(0.02)
        try:
            assert first not in p.pids and len(p.pids) == 1 and p.early_deaths == 0
        finally:
            p.stopping = True
            p._retire(p.pids)
