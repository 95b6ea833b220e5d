"""The serve parent's worker replacement (immediate for a worker that dies, paced for a crash loop)
and its ready board (one probe speaks for every worker; a roll waits for the new generation)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.serving.prefork import Prefork
from services.serving.ready_board import ReadyBoard

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
    p = _parent(lambda _snap, _sock, _seat: os._exit(3))
    real_fork = p._fork
    p._fork = lambda sock, slot: forks.append(time.monotonic()) or real_fork(sock, slot)  # type: ignore[method-assign]
    with socket.socket() as sock, caplog.at_level(logging.WARNING):
        p.pids = {p._fork(sock, 0)}
        _run(p, sock, 5.0)
        p.stopping = True
        p._retire(p.pids)
    # three quick replacements, then one after 2 s (the next would be 4 s later)
    assert 3 <= len(forks) <= 5, [round(t - forks[0], 2) for t in forks]
    assert forks[-1] - forks[0] >= 2.0
    assert any("in a row" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_a_worker_that_dies_after_serving_is_replaced_at_once() -> None:
    p = _parent(lambda _snap, _sock, _seat: (time.sleep(60), os._exit(0)))
    with socket.socket() as sock:
        p.pids = {p._fork(sock, 0)}
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


def _gated(gates: Path):  # type: ignore[no-untyped-def]
    """A worker that says it is ready once a file named after its pid appears in `gates` (and,
    like a real one, says nothing before)."""

    def main(_snap, _sock, seat) -> None:  # type: ignore[no-untyped-def]
        while not (gates / str(os.getpid())).exists():
            time.sleep(0.01)
        seat.report(True)
        time.sleep(120)

    return main


def _wait(cond, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while time.monotonic() < end and not cond():
        time.sleep(0.02)
    return bool(cond())


def _alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return False


def test_the_ready_board_sees_every_worker_and_a_replacement_starts_loading(tmp_path: Path) -> None:
    """The parent and both workers share the board: it is ready only when both workers said so,
    and a worker's replacement counts as loading until it says so itself."""
    p = Prefork(2, builder=None, current=lambda: None, worker=_gated(tmp_path))  # type: ignore[arg-type]
    with socket.socket() as sock:
        try:
            p.pids = {p._fork(sock, slot) for slot in range(2)}
            first, second = sorted(p.pids, key=p.slots.__getitem__)
            (tmp_path / str(first)).touch()
            assert _wait(lambda: p.board.waiting() == 1)
            assert p.board.waiting(but=p.slots[second]) == 0 and not p.board.all_ready()
            (tmp_path / str(second)).touch()
            assert _wait(p.board.all_ready)
            p.born = dict.fromkeys(p.pids, time.monotonic() - 3600)
            os.kill(second, signal.SIGKILL)
            assert _wait(lambda: (p._reap(sock), second not in p.pids and len(p.pids) == 2)[1])
            assert p.board.waiting() == 1  # the replacement took the dead worker's slot, loading
            replacement = next(iter(p.pids - {first}))
            (tmp_path / str(replacement)).touch()
            assert _wait(p.board.all_ready)
        finally:
            p.stopping = True
            p._retire(p.pids)


def test_a_version_roll_retires_the_old_workers_only_once_the_new_ones_are_ready(tmp_path: Path) -> None:
    """Until every worker of the new generation is ready the old generation keeps answering."""

    class Builder:
        models = SimpleNamespace(versions=lambda: [])

        def build(self, version: str, warm: bool) -> SimpleNamespace:
            return SimpleNamespace(version=version)

        def prune(self, keep: set[str]) -> None:
            pass

    current = ["v1"]
    p = Prefork(2, builder=Builder(), current=lambda: current[0], worker=_gated(tmp_path))  # type: ignore[arg-type]
    with socket.socket() as sock:
        p._load()
        old = {p._fork(sock, slot) for slot in range(2)}
        p.pids = set(old)
        for pid in old:
            (tmp_path / str(pid)).touch()
        current[0] = "v2"
        roll = threading.Thread(target=p._follow, args=(sock,))
        roll.start()
        try:
            assert _wait(lambda: len(p.pids - old) == 2)
            new = p.pids - old
            time.sleep(1.0)
            assert all(_alive(pid) for pid in old) and roll.is_alive()  # new ones still loading
            for pid in new:
                (tmp_path / str(pid)).touch()
            roll.join(timeout=40)
            assert not roll.is_alive() and not any(_alive(pid) for pid in old)
            assert p.snapshot.version == "v2" and p.board.all_ready()
        finally:
            p.stopping = True
            roll.join(timeout=60)
            p._retire(p.pids)


def test_a_loaded_worker_waits_for_its_siblings_within_a_bound() -> None:
    """Workers of a generation start accepting together; a sibling that never loads holds the
    others back only as long as the bound."""
    board = ReadyBoard(2)
    me, sibling = board.seat(0), board.seat(1)
    threading.Timer(0.3, sibling.report, args=(True,)).start()
    t0 = time.monotonic()
    assert me.await_siblings(10.0) and 0.25 <= time.monotonic() - t0 < 5.0
    sibling.report(False)
    t0 = time.monotonic()
    assert not me.await_siblings(0.5) and time.monotonic() - t0 >= 0.5
