"""The bulk key builder publish uses gives exactly the documented per-id keys."""

from __future__ import annotations

import zlib

import pytest

from services.infra.keys import Keys

pytestmark = pytest.mark.unit

IDS = ["u1", "t42", "ünïcode-id", "with:colon", "x" * 200, ""]


@pytest.mark.parametrize("buckets", [0, 1, 64, 16384])
def test_vector_keys_equal_the_per_id_keys(buckets: int) -> None:
    k = Keys("encore:", buckets)
    assert k.vector_keys("v1", "user", IDS) == [k.user("v1", i) for i in IDS]
    assert k.vector_keys("v1", "track", IDS) == [k.track("v1", i) for i in IDS]


def test_a_cluster_key_carries_the_crc32_bucket_of_its_id() -> None:
    """What the README tells another service: `{prefix}model:{version}:user:{{bucket}}:{id}`
    with bucket = CRC32(UTF-8 id) mod the bucket count."""
    k = Keys("encore:", 64)
    bucket = zlib.crc32("ünïcode-id".encode()) % 64
    assert k.vector_keys("v1", "user", ["ünïcode-id"]) == [f"encore:model:v1:user:{{{bucket}}}:ünïcode-id"]
