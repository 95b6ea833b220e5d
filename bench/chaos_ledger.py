"""Where every acknowledged play of the chaos soak landed: partition, offset, time of the ack.

When the oracle finds a history wrong, the soak names the plays involved with their offsets and
ack times, so the fault they fell next to (and the worker log lines around it) can be found.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np


class Ledger:
    """Fixed-size arrays indexed by the message number (the stream is generated in order)."""

    def __init__(self, total: int) -> None:
        self.partition = np.full(total, -1, dtype=np.int16)
        self.offset = np.full(total, -1, dtype=np.int64)
        self.acked_at = np.zeros(total, dtype=np.float64)  # time.time() of the ack
        self._plays: dict[tuple[str, str], list[int]] = defaultdict(list)

    def acked(self, i: int, partition: int, offset: int) -> None:
        if 0 <= i < self.partition.size:
            self.partition[i], self.offset[i], self.acked_at[i] = partition, offset, time.time()

    def play(self, i: int, user: str, track: str) -> None:
        self._plays[(user, track)].append(i)

    def where(self, user: str, track: str, t0: float | None = None) -> list[dict[str, Any]]:
        """Every acknowledged play of (user, track): message number, partition, offset, ack time
        (seconds since `t0` when given, as the soak reports faults)."""
        base = 0.0 if t0 is None else t0
        return [
            {
                "message": i,
                "partition": int(self.partition[i]),
                "offset": int(self.offset[i]),
                "acked_at_s": round(float(self.acked_at[i]) - base, 3),
            }
            for i in self._plays.get((user, track), [])
        ]
