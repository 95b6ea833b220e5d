"""A throw-away certificate authority for loopback TLS: tests and the embedded secure demo.

Made with the `openssl` command (on every Debian machine) rather than hand-rolled crypto: one
CA, a server certificate for 127.0.0.1/localhost and a client certificate for mutual TLS, all
short-lived and written to one folder. Never for production: a deployment brings its own PKI.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from core.errors import EncoreError


@dataclass(frozen=True)
class Certificates:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise EncoreError("openssl not found (Debian package openssl)")
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise EncoreError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")


def make_certificates(folder: Path, days: int = 2) -> Certificates:
    """CA, `server` (SAN 127.0.0.1, localhost) and `client` key pairs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    c = Certificates(folder)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
        "-keyout", str(folder / "ca.key"), "-out", str(c.ca), "-subj", "/CN=encore throw-away CA",
    )  # fmt: skip
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", str(ext)]), ("client", [])):
        csr = folder / f"{name}.csr"
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(c.key(name)), "-out", str(csr),
            "-subj", f"/CN=encore {name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(c.ca), "-CAkey", str(folder / "ca.key"),
            "-CAcreateserial", "-days", str(days), "-out", str(c.cert(name)), *extra,
        )  # fmt: skip
    return c
