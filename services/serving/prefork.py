"""`encore serve` with several workers: the parent holds the current version's snapshot and forks
the workers from it, so the graphs, vectors and id maps are in memory once per machine.

uvicorn's own worker manager starts each worker as a fresh interpreter, so each one built or
loaded its own copy of both graphs (memory grew with the cores). Here the parent loads the
snapshot, then forks the workers: they share its pages copy-on-write. A worker applies
`factor-updates` to the graphs itself, so the pages those updates touch become its own, and the
Python objects it reads (ids, maps) are copied page by page as their reference counts change;
the graphs, the factor arrays and everything not touched stay shared.

When the current version changes, the parent builds the new snapshot (the old generation answers
meanwhile), forks a new generation on the same listening socket, waits until each new worker says
on the shared ready board that it is ready (`ready_board`), and stops the old one the way uvicorn
stops: open requests finish, then the process exits. A worker that dies is replaced. The
parent runs no parallel numba code before forking (GNU OpenMP's threads do not survive a fork):
each worker warms its own kernels.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.serving.ready_board import ReadyBoard, Seat
from services.serving.snapshots import Snapshot, SnapshotBuilder

log = logging.getLogger(__name__)
POLL_S = 1.0
DRAIN_S = 30.0  # an old generation's requests get this long before SIGKILL
EARLY_S = 10.0  # a worker that dies sooner than this after its fork counts as a crash loop
MAX_PAUSE_S = 30.0
READY_WAIT_S = 60.0  # a new generation gets this long to be ready before the old one is retired
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


@dataclass
class Listener:
    host: str
    port: int
    cert: str | None = None
    key: str | None = None

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=2048)
        sock.set_inheritable(True)
        return sock


# What a forked worker runs: (snapshot or None, listening socket, its ready slot) → never returns.
WorkerMain = Callable[[Snapshot | None, socket.socket, Seat], None]


class Prefork:
    """The parent: follows the current version, forks workers from its snapshot, replaces dead
    ones, rolls the generation on a version change, and stops them all on SIGTERM/SIGINT."""

    def __init__(
        self, workers: int, builder: SnapshotBuilder, current: Callable[[], str | None], worker: WorkerMain
    ) -> None:
        self.n, self.builder, self.current, self.worker = workers, builder, current, worker
        self.snapshot: Snapshot | None = None
        self.pids: set[int] = set()
        self.born: dict[int, float] = {}  # pid → when it was forked
        self.board = ReadyBoard(workers)  # the current generation's ready slots
        self.slots: dict[int, int] = {}  # pid of the current generation → its slot
        self.free: list[int] = []  # slots whose worker died: replacements are owed
        self.early_deaths = 0  # in a row: replacements then wait, doubling up to MAX_PAUSE_S
        self.fork_at = 0.0  # replacements not before then
        self.stopping = False

    def run(self, sock: socket.socket) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self._load()
        self.pids = {self._fork(sock, slot) for slot in range(self.n)}
        while not self.stopping:
            time.sleep(POLL_S)
            self._reap(sock)
            if not self.stopping:
                self._follow(sock)
        self._retire(self.pids)
        return 0

    def _stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def _load(self) -> bool:
        """Build the current version's snapshot here (False: none, or it is already loaded)."""
        try:
            version = self.current()
            if version is None or (self.snapshot is not None and self.snapshot.version == version):
                return False
            snap = self.builder.build(version, warm=False)
        except Exception as exc:  # noqa: BLE001 - Redis away or the version expired: next poll
            log.warning("serve: cannot load the current version yet (%s); workers keep their snapshot", exc)
            return False
        old, self.snapshot = self.snapshot, snap
        del old
        gc.collect()
        gc.freeze()  # the collector never walks (and so never writes to) the shared objects
        log.info("serve: version %s loaded once for %d workers", snap.version, self.n)
        return True

    def _follow(self, sock: socket.socket) -> None:
        if not self._load():
            return
        self.board, self.slots, self.free = ReadyBoard(self.n), {}, []
        old, self.pids = self.pids, {self._fork(sock, slot) for slot in range(self.n)}
        self._await_ready()
        self._retire(old)
        assert self.snapshot is not None
        self.builder.prune({self.snapshot.version} | {v for v, _ in self.builder.models.versions()})

    def _await_ready(self) -> None:
        """Let the new generation load (catalogue, kernels) while the old one still answers."""
        deadline = time.monotonic() + READY_WAIT_S
        while not self.board.all_ready() and not self.stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.board.all_ready() and not self.stopping:
            log.warning(
                "serve: %d new workers not ready after %.0fs; retiring the old ones anyway",
                self.board.waiting(),
                READY_WAIT_S,
            )

    def _fork(self, sock: socket.socket, slot: int) -> int:
        self.board.reset(slot)
        pid = os.fork()
        if pid:
            self.born[pid], self.slots[pid] = time.monotonic(), slot
        if pid == 0:  # the worker
            code = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent()
                self.worker(self.snapshot, sock, self.board.seat(slot))
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's loop
                log.exception("serve worker %d failed", os.getpid())
                code = 3
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def _reap(self, sock: socket.socket) -> None:
        """Replace workers of the current generation that died (an old one exiting is expected);
        workers that keep dying right after their fork are replaced after a growing pause, with
        an error in the log, rather than re-forked as fast as they die."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            lived = time.monotonic() - self.born.pop(pid, 0.0)
            slot = self.slots.pop(pid, None)
            if pid in self.pids and slot is not None and not self.stopping:
                self.early_deaths = self.early_deaths + 1 if lived < EARLY_S else 0
                self.free.append(slot)
                if self.early_deaths < 3:
                    log.warning("serve worker %d exited (status %d); starting another", pid, status)
                else:
                    pause = min(MAX_PAUSE_S, 2.0 ** (self.early_deaths - 2))
                    self.fork_at = time.monotonic() + pause
                    log.error(
                        "serve worker %d exited (status %d) %.1fs after it started, %d in a row: "
                        "the next one in %.0fs (the cause is in the lines above)",
                        pid,
                        status,
                        lived,
                        self.early_deaths,
                        pause,
                    )
            self.pids.discard(pid)
        while self.free and not self.stopping and time.monotonic() >= self.fork_at:
            self.pids.add(self._fork(sock, self.free.pop()))

    def _retire(self, pids: set[int]) -> None:
        """SIGTERM (uvicorn finishes open requests), then SIGKILL what is left after DRAIN_S."""
        for pid in pids:
            self.born.pop(pid, None)
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_S
        left = set(pids)
        while left and time.monotonic() < deadline:
            for pid in list(left):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    left.discard(pid)
            time.sleep(0.05)
        for pid in left:
            log.warning("serve worker %d did not stop in %.0fs; killing it", pid, DRAIN_S)
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _die_with_parent() -> None:
    """A worker whose parent was SIGKILLed gets SIGTERM (Linux PR_SET_PDEATHSIG) rather than
    holding the port with nobody to follow versions or replace it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed parent
        return
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
