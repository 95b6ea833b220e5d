"""The Redis key schema (documented in the README); the only place key strings are built."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix (default `encore:`)."""

    prefix: str = "encore:"

    @property
    def current(self) -> str:
        return f"{self.prefix}model:current"

    @property
    def versions(self) -> str:
        """Sorted set of published versions, scored by publish time."""
        return f"{self.prefix}model:versions"

    def meta(self, version: str) -> str:
        return f"{self.prefix}model:{version}:meta"

    def user(self, version: str, user_id: str) -> str:
        return f"{self.prefix}model:{version}:user:{user_id}"

    def track(self, version: str, track_id: str) -> str:
        return f"{self.prefix}model:{version}:track:{track_id}"

    def version_pattern(self, version: str) -> str:
        return f"{self.prefix}model:{version}:*"

    def history(self, user_id: str) -> str:
        """Hash track_id → accumulated play weight."""
        return f"{self.prefix}plays:user:{user_id}"

    def listeners(self, track_id: str) -> str:
        """Sorted set user_id → last play ts (recent listeners, capped)."""
        return f"{self.prefix}listeners:track:{track_id}"

    def offsets(self, group: str) -> str:
        """Hash `incarnation|partition` → last applied offset."""
        return f"{self.prefix}offsets:{group}"

    @property
    def dirty_users(self) -> str:
        """Sorted set user_id → ts of last history change (catch-up after a retrain)."""
        return f"{self.prefix}dirty:users"

    @property
    def new_tracks(self) -> str:
        """Set of track ids seen in plays but unknown to the current model."""
        return f"{self.prefix}tracks:new"


def encode_vector(v: np.ndarray) -> bytes:
    """float32 little-endian bytes."""
    return np.asarray(v, dtype="<f4").tobytes()


def decode_vector(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").copy()
