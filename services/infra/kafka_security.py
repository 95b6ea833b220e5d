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


# (librdkafka property, kafka-python argument, Settings field) of each TLS file
_TLS_FILES = (
    ("ssl.ca.location", "ssl_cafile", "kafka_ca_file"),
    ("ssl.certificate.location", "ssl_certfile", "kafka_cert_file"),
    ("ssl.key.location", "ssl_keyfile", "kafka_key_file"),
)


def rdkafka_config(s: Settings) -> dict[str, Any]:
    """librdkafka properties (confluent-kafka)."""
    tls, sasl = _checked(s)
    out: dict[str, Any] = {"security.protocol": s.kafka_security_protocol.lower()}
    if tls:
        out["enable.ssl.certificate.verification"] = True
        out["ssl.endpoint.identification.algorithm"] = "https"
        out.update({prop: getattr(s, f) for prop, _, f in _TLS_FILES if getattr(s, f)})
    if sasl:
        out["sasl.mechanisms"] = s.kafka_sasl_mechanism
        out["sasl.username"], out["sasl.password"] = s.kafka_username, _password(s)
    return out


def kafka_python_config(s: Settings) -> dict[str, Any]:
    """kafka-python keyword arguments."""
    tls, sasl = _checked(s)
    out: dict[str, Any] = {"security_protocol": s.kafka_security_protocol}
    if tls:
        out["ssl_check_hostname"] = True
        out.update({arg: getattr(s, f) for _, arg, f in _TLS_FILES if getattr(s, f)})
    if sasl:
        out["sasl_mechanism"] = s.kafka_sasl_mechanism
        out["sasl_plain_username"], out["sasl_plain_password"] = s.kafka_username, _password(s)
    return out
