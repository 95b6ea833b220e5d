"""Kafka TLS and SASL settings, mapped once for each client library Encore uses.

The fold-in worker's consumer and producer are librdkafka (confluent-kafka); admin calls, the
trainer's reader and low-rate producers are kafka-python. Both get the same security from the
same ENCORE_KAFKA_* settings through these two functions, so no client is left in plain text.
The Spark engine never talks to Kafka (the trainer reads plays and hands Spark a Parquet file),
so it needs nothing here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ConfigError
from services.infra.settings import Settings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _password(s: Settings) -> str:
    if not s.kafka_password_file:
        return s.kafka_password
    try:
        return Path(s.kafka_password_file).read_text().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(
            f"ENCORE_KAFKA_PASSWORD_FILE={s.kafka_password_file}: cannot read a password ({exc})"
        ) from None


def _checked(s: Settings) -> tuple[bool, bool]:
    """(tls, sasl) after checking the combination is complete and the files exist."""
    proto = s.kafka_security_protocol
    tls, sasl = proto in ("SSL", "SASL_SSL"), proto.startswith("SASL")
    if sasl and not (s.kafka_username and (s.kafka_password or s.kafka_password_file)):
        raise ConfigError(f"ENCORE_KAFKA_SECURITY_PROTOCOL={proto} needs ENCORE_KAFKA_USERNAME and a password")
    if not tls and (s.kafka_ca_file or s.kafka_cert_file):
        raise ConfigError(f"ENCORE_KAFKA_CA_FILE / _CERT_FILE need SSL or SASL_SSL, not {proto}")
    if bool(s.kafka_cert_file) != bool(s.kafka_key_file):
        raise ConfigError("ENCORE_KAFKA_CERT_FILE and ENCORE_KAFKA_KEY_FILE go together (mutual TLS)")
    for name, path in (("CA", s.kafka_ca_file), ("CERT", s.kafka_cert_file), ("KEY", s.kafka_key_file)):
        if path and not Path(path).is_file():
            raise ConfigError(f"ENCORE_KAFKA_{name}_FILE={path}: no such file")
    return tls, sasl


def rdkafka_config(s: Settings) -> dict[str, Any]:
    """librdkafka properties (confluent-kafka)."""
    tls, sasl = _checked(s)
    out: dict[str, Any] = {"security.protocol": s.kafka_security_protocol.lower()}
    if tls:
        out["enable.ssl.certificate.verification"] = True
        out["ssl.endpoint.identification.algorithm"] = "https"
        for prop, path in (
            ("ssl.ca.location", s.kafka_ca_file),
            ("ssl.certificate.location", s.kafka_cert_file),
            ("ssl.key.location", s.kafka_key_file),
        ):
            if path:
                out[prop] = path
    if sasl:
        out.update(
            {
                "sasl.mechanisms": s.kafka_sasl_mechanism,
                "sasl.username": s.kafka_username,
                "sasl.password": _password(s),
            }
        )
    return out


def kafka_python_config(s: Settings) -> dict[str, Any]:
    """kafka-python keyword arguments."""
    tls, sasl = _checked(s)
    out: dict[str, Any] = {"security_protocol": s.kafka_security_protocol}
    if tls:
        out["ssl_check_hostname"] = True
        for arg, path in (
            ("ssl_cafile", s.kafka_ca_file),
            ("ssl_certfile", s.kafka_cert_file),
            ("ssl_keyfile", s.kafka_key_file),
        ):
            if path:
                out[arg] = path
    if sasl:
        out.update(
            {
                "sasl_mechanism": s.kafka_sasl_mechanism,
                "sasl_plain_username": s.kafka_username,
                "sasl_plain_password": _password(s),
            }
        )
    return out
