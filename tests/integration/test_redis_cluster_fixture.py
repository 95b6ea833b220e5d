"""The embedded Redis Cluster is a real one: slots spread over three masters, keys routed by
slot, and a master killed with SIGKILL is replaced by its replica with the data it had."""

from __future__ import annotations

import time

import pytest
import redis

from services.infra.embedded_cluster import EmbeddedRedisCluster


@pytest.fixture(scope="module")
def cluster() -> object:
    c = EmbeddedRedisCluster.start(masters=3, replicas=1)
    yield c
    c.stop()


def test_slots_spread_over_three_masters_and_cross_slot_scripts_refused(cluster: EmbeddedRedisCluster) -> None:
    rc = redis.RedisCluster.from_url(cluster.url)
    try:
        keys = [f"k{i}" for i in range(300)]
        rc.mset_nonatomic({k: k for k in keys})
        owners = {rc.get_node_from_key(k).port for k in keys}
        assert len(owners) == 3  # 300 keys cannot all land on fewer masters
        assert rc.mget_nonatomic(keys) == [k.encode() for k in keys]
        with pytest.raises(redis.exceptions.RedisClusterException):
            rc.eval("return redis.call('GET', KEYS[1])", 2, "k1", "k2")  # different slots
        assert rc.eval("return redis.call('GET', KEYS[2])", 2, "{t}a", "{t}b") is None  # one hash tag: allowed
    finally:
        rc.close()


def test_killed_master_is_replaced_by_its_replica(cluster: EmbeddedRedisCluster) -> None:
    rc = redis.RedisCluster.from_url(cluster.url)
    try:
        rc.set("{failover}x", "before")
        victim = rc.get_node_from_key("{failover}x").port
        assert cluster.node(victim).execute_command("WAIT", 1, 5000) == 1  # the replica has it
        cluster.kill(victim)
        deadline = time.monotonic() + 30
        value, new_owner = None, victim
        while time.monotonic() < deadline:
            try:
                fresh = redis.RedisCluster.from_url(f"redis://127.0.0.1:{cluster.master_ports()[0]}/0")
                value = fresh.get("{failover}x")
                new_owner = fresh.get_node_from_key("{failover}x").port
                fresh.close()
                if new_owner != victim:
                    break
            except (redis.RedisError, redis.exceptions.RedisClusterException, IndexError):
                pass
            time.sleep(0.3)
        assert new_owner != victim
        assert value == b"before"
        assert victim not in cluster.master_ports()
    finally:
        rc.close()
