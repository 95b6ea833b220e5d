"""ENCORE_KAFKA_* security mapped to both client libraries: SASL is tested here, by mapping
only (no broker on this machine speaks SASL); TLS also end to end in test_kafka_tls.py."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from services.infra.kafka_security import kafka_python_config, rdkafka_config
from services.infra.settings import Settings


def test_sasl_ssl_with_scram_maps_to_both_libraries(tmp_path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    s = Settings.from_env(
        {
            "ENCORE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "ENCORE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "ENCORE_KAFKA_USERNAME": "encore",
            "ENCORE_KAFKA_PASSWORD_FILE": str(pw),
            "ENCORE_KAFKA_CA_FILE": str(ca),
        }
    )
    rd = rdkafka_config(s)
    assert rd["security.protocol"] == "sasl_ssl" and rd["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert rd["sasl.username"] == "encore" and rd["sasl.password"] == "from-file"
    assert rd["ssl.ca.location"] == str(ca) and rd["enable.ssl.certificate.verification"] is True
    kp = kafka_python_config(s)
    assert kp["security_protocol"] == "SASL_SSL" and kp["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kp["sasl_plain_username"] == "encore" and kp["sasl_plain_password"] == "from-file"
    assert kp["ssl_cafile"] == str(ca) and kp["ssl_check_hostname"] is True
    shown = {name: value for name, value, _ in s.with_(kafka_password="p4ss").describe()}
    assert "p4ss" not in shown["ENCORE_KAFKA_PASSWORD"]


def test_plaintext_adds_nothing_but_the_protocol() -> None:
    assert rdkafka_config(Settings()) == {"security.protocol": "plaintext"}
    assert kafka_python_config(Settings()) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "USERNAME"),
        ({"kafka_security_protocol": "PLAINTEXT", "kafka_ca_file": "/etc/hostname"}, "need SSL"),
        ({"kafka_security_protocol": "SSL", "kafka_cert_file": "/etc/hostname"}, "go together"),
        ({"kafka_security_protocol": "SSL", "kafka_ca_file": "/no/such/ca.crt"}, "no such file"),
    ],
)
def test_incomplete_security_is_a_clear_error(changes: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rdkafka_config(Settings().with_(**changes))
    with pytest.raises(ConfigError, match="SASL_SSL|PLAINTEXT|SSL"):
        Settings.from_env({"ENCORE_KAFKA_SECURITY_PROTOCOL": "TLS"})
