"""A/B experiments between model versions: arms, traffic shares and stable assignment.

`ENCORE_EXPERIMENT` reads `NAME:ARM=SHARE,ARM=SHARE,...`, where an arm is `current`,
`candidate` or a model version, and shares are relative weights (`ab1:current=90,candidate=10`).
A user's arm is a pure function of (experiment name, user id): a keyed BLAKE2b hash mapped to
[0, 1) and cut by the cumulative shares, so every replica and every restart agrees, and a new
experiment name reshuffles users independently of the last one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from core.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ARM = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[tuple[str, float], ...]  # (arm, share), shares summing to 1

    @classmethod
    def parse(cls, spec: str) -> Experiment | None:
        """The experiment in `spec`; None for an empty spec (no experiment running)."""
        spec = spec.strip()
        if not spec:
            return None
        name, sep, rest = spec.partition(":")
        if not sep or not NAME.match(name):
            raise ConfigError(
                f"ENCORE_EXPERIMENT={spec!r}: expected NAME:ARM=SHARE,ARM=SHARE (e.g. ab1:current=90,candidate=10)"
            )
        arms: list[tuple[str, float]] = []
        for part in rest.split(","):
            arm, eq, share = part.strip().rpartition("=")
            try:
                weight = float(share)
            except ValueError:
                weight = -1.0
            if not eq or not ARM.match(arm) or not weight > 0 or weight != weight or weight == float("inf"):
                raise ConfigError(f"ENCORE_EXPERIMENT: arm {part.strip()!r} is not ARM=SHARE with a share > 0")
            if arm in (a for a, _ in arms):
                raise ConfigError(f"ENCORE_EXPERIMENT: arm {arm!r} is named twice")
            arms.append((arm, weight))
        if len(arms) < 2:
            raise ConfigError("ENCORE_EXPERIMENT: an experiment needs at least two arms")
        total = sum(w for _, w in arms)
        return cls(name, tuple((a, w / total) for a, w in arms))

    def position(self, user_id: str) -> float:
        """Where the user falls in [0, 1) for this experiment."""
        digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=self.name.encode()[:64]).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def arm_of(self, user_id: str) -> str:
        x, edge = self.position(user_id), 0.0
        for arm, share in self.arms:
            edge += share
            if x < edge:
                return arm
        return self.arms[-1][0]  # rounding of the last edge

    @property
    def arm_names(self) -> list[str]:
        return [a for a, _ in self.arms]
