"""Which workers of one `encore serve` generation are ready, in one page shared across forks.

The workers accept on one listening socket and the kernel hands each connection to whichever
worker takes it first. A probe of /ready therefore spoke for one worker only: `encore up` (or a
load balancer) could hear "ready" from a worker that had loaded everything while its sibling was
still reading the catalogue, and the next request then met a 503. Each worker now writes its own
state into a byte of an anonymous shared mapping made by the parent before the fork, and /ready
says yes only when every worker of the generation has. A loaded worker waits for its siblings
before it accepts (they start together), and the parent reads the same bytes to retire the old
generation only once the new one is ready.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass


class ReadyBoard:
    """One byte per worker slot (0 loading, 1 ready), shared by the parent and its forks."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._mem = mmap.mmap(-1, workers)  # anonymous and MAP_SHARED: forks see each other's writes

    def reset(self, slot: int) -> None:
        """A slot about to get a new worker (a replacement starts loading again)."""
        self._mem[slot] = 0

    def seat(self, slot: int) -> Seat:
        return Seat(self, slot)

    def waiting(self, but: int | None = None) -> int:
        """How many workers (other than slot `but`) are not ready yet."""
        return sum(1 for s in range(self.workers) if s != but and not self._mem[s])

    def all_ready(self) -> bool:
        return self.waiting() == 0


@dataclass
class Seat:
    """A worker's own slot: it reports its state and asks about its siblings'."""

    board: ReadyBoard
    slot: int

    def report(self, ready: bool) -> None:
        self.board._mem[self.slot] = 1 if ready else 0

    def others_waiting(self) -> int:
        return self.board.waiting(but=self.slot)

    def await_siblings(self, timeout: float) -> bool:
        """Wait (bounded) for the generation's other workers, so that they start accepting
        together: during a version roll the old generation answers until the new one can answer
        whole, rather than a new worker saying "not ready" for a sibling still loading."""
        deadline = time.monotonic() + timeout
        while self.others_waiting() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.others_waiting()
