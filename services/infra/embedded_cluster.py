"""A real Redis Cluster as child processes on loopback: masters, replicas, `redis-cli --cluster`.

For tests and benchmarks where no cluster is given (`ENCORE_TEST_REDIS_CLUSTER_URL`) and no
Docker engine answers. Every node is a `redis-server --cluster-enabled yes` with its own folder
and append-only file; `redis-cli --cluster create … --cluster-replicas N` assigns the 16384
slots and pairs replicas with masters, exactly as an operator would build one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis

from core.errors import EncoreError
from services.infra.embedded import redis_command, spawn, stop_processes, wait_port

log = logging.getLogger(__name__)
NODE_TIMEOUT_MS = 2000  # failover within a few seconds of a master's death


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        if _free(port) and _free(port + 10_000):
            return port
    raise EncoreError("no free port pair for a Redis Cluster node")


@dataclass
class EmbeddedRedisCluster:
    """`masters` masters with `replicas` replicas each; `url` names one master."""

    masters: int = 3
    replicas: int = 1
    workdir: str = ""
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def start(cls, masters: int = 3, replicas: int = 1) -> EmbeddedRedisCluster:
        c = cls(masters, replicas, tempfile.mkdtemp(prefix="encore-redis-cluster-"))
        try:
            for _ in range(masters * (1 + replicas)):
                c._start_node(cluster_port())
            nodes = [f"127.0.0.1:{p}" for p in c.ports]
            subprocess.run(
                [c._cli(), "--cluster", "create", *nodes, "--cluster-replicas", str(replicas), "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            c.wait_healthy(replicas_attached=True)
        except BaseException:
            c.stop()
            raise
        log.info("embedded Redis Cluster: %d masters, %d replicas each, on %s", masters, replicas, c.ports)
        return c

    def _start_node(self, port: int) -> None:
        folder = os.path.join(self.workdir, str(port))
        os.makedirs(folder, exist_ok=True)
        cmd = redis_command(
            port,
            folder,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            "--repl-diskless-sync-delay",
            "0",
        )
        proc = spawn(cmd, os.path.join(folder, "redis.log"))
        self.procs[port] = proc
        if port not in self.ports:
            self.ports.append(port)
        wait_port(port, proc, "redis-server (cluster node)")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def info(self, port: int) -> dict[str, str]:
        raw = self.node(port).execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def master_ports(self) -> list[int]:
        """Ports of the live masters (from a live node's view)."""
        for p in self.live_ports():
            out = []
            for line in self.node(p).execute_command("CLUSTER", "NODES").decode().splitlines():
                parts = line.split()
                if "master" in parts[2] and "fail" not in parts[2] and parts[7] == "connected":
                    out.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
            return sorted(out)
        return []

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def replica_count(self) -> int:
        """Replicas whose link to their master is up (initial sync done: able to fail over)."""
        n = 0
        for p in self.live_ports():
            info = self.node(p).info("replication")
            n += info.get("role") == "slave" and info.get("master_link_status") == "up"
        return n

    def wait_healthy(self, timeout: float = 60.0, replicas_attached: bool = False) -> None:
        """Until every live node reports cluster_state:ok with all slots served (and, when asked,
        every replica attached to its master)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok = all(
                    (i := self.info(p)).get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                    for p in self.live_ports()
                )
                if ok and (not replicas_attached or self.replica_count() == self.masters * self.replicas):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise EncoreError("Redis Cluster did not become healthy")
            time.sleep(0.2)

    def reshard(self, from_port: int, to_port: int, slots: int) -> None:
        """Move `slots` slots (with their keys, live) from one master to another, as an
        operator does with `redis-cli --cluster reshard`: clients see ASK and MOVED meanwhile."""
        ids = {p: self.node(p).execute_command("CLUSTER", "MYID").decode() for p in (from_port, to_port)}
        subprocess.run(
            [
                self._cli(),
                "--cluster",
                "reshard",
                f"127.0.0.1:{from_port}",
                "--cluster-from",
                ids[from_port],
                "--cluster-to",
                ids[to_port],
                "--cluster-slots",
                str(slots),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )

    def slot_ranges(self, port: int) -> list[tuple[int, int]]:
        """The slot ranges the master on `port` serves (its own view)."""
        return [(int(e[0]), int(e[1])) for e in self.node(port).execute_command("CLUSTER", "SLOTS") if e[2][1] == port]

    def unassign(self, port: int) -> list[tuple[int, int]]:
        """Take a master's slots out of every node's map (CLUSTER DELSLOTSRANGE everywhere): the
        cluster has unassigned slots and answers CLUSTERDOWN; the node keeps its keys."""
        ranges = self.slot_ranges(port)
        for p in self.live_ports():
            for lo, hi in ranges:
                self.node(p).execute_command("CLUSTER", "DELSLOTSRANGE", lo, hi)
        return ranges

    def assign(self, port: int, ranges: list[tuple[int, int]]) -> None:
        """Give `ranges` to the master on `port` (CLUSTER ADDSLOTSRANGE); gossip spreads the claim."""
        for lo, hi in ranges:
            self.node(port).execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)

    @staticmethod
    def _cli() -> str:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise EncoreError("redis-cli not found (Debian package redis-tools / redis-server)")
        return cli

    def restart(self, port: int) -> None:
        """Start a killed node again on its port and folder (its append-only file and
        nodes.conf): it rejoins with the slots it had, minus what its AOF had not synced."""
        self._start_node(port)

    def kill(self, port: int) -> None:
        """SIGKILL one node (no flush, no goodbye)."""
        proc = self.procs[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        stop_processes(list(self.procs.values()))
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
