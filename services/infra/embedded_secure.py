"""`encore up --secure`: the embedded servers with TLS and credentials made at start.

So a newcomer sees the secure setup run, on loopback: a throw-away CA (never for production),
Redis listening only on TLS with the default user off and an ACL user limited to Encore's
prefix without @dangerous/@admin (the README's line), the broker reachable only through a TLS
endpoint (stunnel, as in the tests; it advertises stunnel's address), the API on HTTPS with a
generated read key and admin key. What the services need is returned as ENCORE_* variables.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.errors import EncoreError
from services.infra.embedded import EmbeddedServers, free_port, redis_command, spawn, wait_port
from services.infra.throwaway_ca import Certificates, make_certificates


@dataclass
class SecureServers:
    servers: EmbeddedServers
    env: dict[str, str]
    read_key: str
    admin_key: str
    ca: Path


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return path


def tls_redis_command(port: int, folder: Path, certs: Certificates, client_certs: bool, *extra: str) -> list[str]:
    """redis-server listening only on TLS at `port` (no plain port); `client_certs` requires
    clients to present a certificate from the CA (mutual TLS)."""
    cmd = redis_command(0, str(folder))
    cmd += ["--tls-port", str(port), "--tls-cert-file", str(certs.cert("server"))]
    cmd += ["--tls-key-file", str(certs.key("server")), "--tls-ca-cert-file", str(certs.ca)]
    return [*cmd, "--tls-auth-clients", "yes" if client_certs else "no", *extra]


def start_kafka_tls(servers: EmbeddedServers, certs: Certificates, folder: Path, client_certs: bool) -> str:
    """Start the embedded broker behind a stunnel TLS endpoint (the broker advertises stunnel's
    address); returns the endpoint's bootstrap. stunnel is added to `servers`' processes."""
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if stunnel is None:
        raise EncoreError("a TLS endpoint for the broker needs stunnel (Debian package stunnel4)")
    tls_port = free_port()
    servers.start_kafka(advertised_port=tls_port)
    conf = folder / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls_port}\nconnect = {servers.kafka_bootstrap}\n"
        f"cert = {certs.cert('server')}\nkey = {certs.key('server')}\n"
        + (f"CAfile = {certs.ca}\nverify = 2\n" if client_certs else "")
    )
    tunnel = spawn([stunnel, str(conf)], str(folder / "stunnel.log"))
    servers.procs.append(tunnel)
    wait_port(tls_port, tunnel, "stunnel (Kafka TLS)")
    return f"127.0.0.1:{tls_port}"


def start_secure(folder: Path, key_prefix: str) -> SecureServers:
    """Certificates, keys and both servers under `folder` (Redis keeps its AOF in folder/redis)."""
    secrets_dir = folder / "secure"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    certs = make_certificates(secrets_dir / "certs")
    redis_dir = folder / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    servers = EmbeddedServers(workdir=str(redis_dir), keep=True)
    try:
        password = secrets.token_urlsafe(24)
        redis_port = free_port()
        users = ["--user", "default", "off"]
        users += ["--user", "encore", "on", f">{password}", f"~{key_prefix}*", "+@all", "-@dangerous", "-@admin"]
        proc = spawn(tls_redis_command(redis_port, redis_dir, certs, False, *users), str(redis_dir / "redis.log"))
        servers.procs.append(proc)
        wait_port(redis_port, proc, "redis-server (TLS)")
        servers.redis_url = f"rediss://127.0.0.1:{redis_port}/0"
        servers.kafka_bootstrap = start_kafka_tls(servers, certs, secrets_dir, client_certs=False)
    except BaseException:
        servers.stop()
        raise
    read_key, admin_key = f"read-{secrets.token_urlsafe(18)}", f"admin-{secrets.token_urlsafe(18)}"
    env = {
        "ENCORE_REDIS_URL": servers.redis_url,
        "ENCORE_REDIS_USERNAME": "encore",
        "ENCORE_REDIS_PASSWORD_FILE": str(_secret_file(secrets_dir / "redis.password", password)),
        "ENCORE_REDIS_CA_FILE": str(certs.ca),
        "ENCORE_KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
        "ENCORE_KAFKA_SECURITY_PROTOCOL": "SSL",
        "ENCORE_KAFKA_CA_FILE": str(certs.ca),
        "ENCORE_API_TLS_CERT": str(certs.cert("server")),
        "ENCORE_API_TLS_KEY": str(certs.key("server")),
        "ENCORE_API_KEYS_FILE": str(_secret_file(secrets_dir / "api.keys", read_key)),
        "ENCORE_ADMIN_API_KEYS_FILE": str(_secret_file(secrets_dir / "admin.keys", admin_key)),
    }
    return SecureServers(servers, env, read_key, admin_key, certs.ca)
