"""Typed messages Encore writes to Kafka, with their codecs (the play event is in `core.events`).

Each is a frozen dataclass; `encode`/`decode` are the only places the wire format is built or
read, so the README's contract lives in one spot.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import orjson

Entity = Literal["user", "track"]
VECTOR_DTYPE = "<f4"


class MessageError(ValueError):
    """A message value does not follow its documented schema."""


def encode_vector(v: np.ndarray) -> bytes:
    """float32 little-endian bytes: the encoding in Redis and inside `factor-updates`."""
    return np.asarray(v, dtype=VECTOR_DTYPE).tobytes()


def encode_vectors(vectors: np.ndarray) -> list[bytes]:
    """`encode_vector` of each row, sliced from one buffer (one conversion for thousands of rows)."""
    raw = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE).tobytes()
    width = 4 * vectors.shape[1] if vectors.ndim == 2 else 0
    return [raw[i : i + width] for i in range(0, len(raw), width)] if width else []


def decode_vector(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=VECTOR_DTYPE).copy()


@dataclass(frozen=True, eq=False)
class FactorUpdate:
    """One record of `factor-updates`: an entity's new vector in a model version, or its removal.

    Key `user:{id}` / `track:{id}`; value `{"model_version", "dtype": "float32le", "vector":
    base64}`; a null value (vector None) removes the entity from serving indexes.
    """

    entity: Entity
    entity_id: str
    model_version: str = ""
    vector: np.ndarray | None = field(default=None, repr=False)

    def key(self) -> bytes:
        return f"{self.entity}:{self.entity_id}".encode()

    def value(self) -> bytes | None:
        """base64 of the Redis bytes: a JSON list of 64 floats costs several times more to build
        and parse on the hot path."""
        if self.vector is None:
            return None
        return _value_head(self.model_version) + base64.b64encode(encode_vector(self.vector)) + b'"}'

    @staticmethod
    def encode_many(
        entity: Entity, model_version: str, ids: list[str], vectors: np.ndarray
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of one update per row, byte-identical to `key()`/`value()`: the speed
        layer announces thousands per batch, and building a message object for each cost more
        than the rest of the encoding."""
        head, prefix = _value_head(model_version), f"{entity}:".encode()
        raw = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE)
        for entity_id, row in zip(ids, raw, strict=True):
            yield prefix + entity_id.encode(), head + base64.b64encode(row.tobytes()) + b'"}'

    @classmethod
    def decode(cls, key: bytes, value: bytes | None) -> FactorUpdate:
        """Parse a record; accepts a base64 or a JSON-list vector. Raises MessageError."""
        entity, sep, entity_id = key.decode("utf-8", "replace").partition(":")
        if not sep or entity not in ("user", "track") or not entity_id:
            raise MessageError(f"factor-updates key {key[:80]!r} is not user:ID or track:ID")
        if value is None:
            return cls(entity, entity_id)  # type: ignore[arg-type]
        try:
            d = orjson.loads(value)
            v = d["vector"]
            vec = decode_vector(base64.b64decode(v)) if isinstance(v, str) else np.asarray(v, dtype=np.float32)
            return cls(entity, entity_id, str(d["model_version"]), vec)  # type: ignore[arg-type]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"factor-updates value for {entity}:{entity_id}: {exc}") from None


def _value_head(model_version: str) -> bytes:
    return b'{"model_version":' + orjson.dumps(model_version) + b',"dtype":"float32le","vector":"'


@dataclass(frozen=True)
class DeadLetter:
    """An input message that was rejected: original bytes, why, and where it came from.

    Produced to the dead-letter topic with the original bytes as value and headers `error` and
    `source` (`topic/partition/offset`, unique per input message, for de-duplication).
    """

    raw: bytes
    error: str
    source: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [("error", self.error.encode()), ("source", self.source.encode())]

    @property
    def offset(self) -> int:
        """The input message's offset, from `source` (`topic/partition/offset`); -1 if absent."""
        tail = self.source.rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    def to_json(self) -> str:
        """Durable form for a Redis queue (raw bytes kept exactly through latin-1)."""
        return json.dumps({"raw": self.raw.decode("latin-1"), "error": self.error, "source": self.source})

    @classmethod
    def from_json(cls, s: bytes | str) -> DeadLetter:
        d = json.loads(s)
        return cls(d["raw"].encode("latin-1"), d["error"], d["source"])
