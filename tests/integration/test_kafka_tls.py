"""Every Kafka client over TLS with client certificates, through a real TLS endpoint: stunnel
terminating TLS in front of the broker, which advertises stunnel's address (tansu's own TLS
did not complete a handshake here). SASL is tested by its configuration mapping only
(tests/unit/test_kafka_security.py): no broker on this machine speaks SASL."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError

from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra.embedded import EmbeddedServers
from services.infra.embedded_secure import start_kafka_tls
from services.infra.settings import Settings
from services.infra.throwaway_ca import make_certificates
from services.produce import PlayPublisher
from tests.integration.helpers import WorkerThread, histories_match, publish_synthetic_model, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_kafka() -> Iterator[tuple[str, Path]]:
    """(bootstrap of the TLS endpoint, certificate folder)."""
    if not (shutil.which("stunnel4") or shutil.which("stunnel")) or shutil.which("openssl") is None:
        pytest.skip("stunnel4 and openssl are needed (scripts/setup.sh installs them)")
    folder = Path(tempfile.mkdtemp(prefix="encore-kafka-tls-"))
    certs = make_certificates(folder / "certs")
    servers = EmbeddedServers(workdir=str(folder))
    try:
        bootstrap = start_kafka_tls(servers, certs, folder, client_certs=True)  # mutual TLS
        yield bootstrap, folder / "certs"
    finally:
        servers.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_foldin_trainer_and_publisher_over_tls(settings: Settings, tls_kafka: tuple[str, Path]) -> None:
    bootstrap, certs = tls_kafka
    s = settings.with_(
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SSL",
        kafka_ca_file=str(certs / "ca.crt"),
        kafka_cert_file=str(certs / "client.crt"),
        kafka_key_file=str(certs / "client.key"),
    )
    root = Root(s)
    root.clients.ensure_topics()  # kafka-python admin over TLS
    publish_synthetic_model(s, root.redis, SyntheticMusic(n_users=100, n_tracks=90, seed=3))
    worker = WorkerThread(s, "encore-foldin")  # librdkafka consumer and producer over TLS
    try:
        pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic, settings=s)
        expected: Counter[str] = Counter()
        for i in range(200):
            pub.publish(f"u{i % 15}", f"t{i % 29}", ms_played=200_000)
            expected[f"u{i % 15}|t{i % 29}"] += 1
        pub.publish("bad-event-user", "", ms_played=1)  # a dead letter, produced over TLS
        pub.flush()
        store = root.history_store()

        assert wait_for(lambda: histories_match(store, expected), timeout=60)
        trainer = root.trainer()  # kafka-python reader of the plays over TLS
        version = trainer.run_once()
        trainer.close()
        assert root.models().current_version() == version
        assert int(root.models().meta(version)[b"n_plays"]) >= len(expected)
    finally:
        worker.stop()
        root.close()


def test_without_the_ca_or_a_client_certificate_nothing_connects(
    settings: Settings, tls_kafka: tuple[str, Path]
) -> None:
    """No silent fallback: a server certificate that does not verify, or no client certificate
    for the mutual-TLS endpoint, and the client gets no broker."""
    bootstrap, certs = tls_kafka
    base = settings.with_(kafka_bootstrap=bootstrap, kafka_security_protocol="SSL")
    no_ca = base.with_(kafka_cert_file=str(certs / "client.crt"), kafka_key_file=str(certs / "client.key"))
    no_cert = base.with_(kafka_ca_file=str(certs / "ca.crt"))
    for s in (no_ca, no_cert):
        with pytest.raises(KafkaTimeoutError, match="bootstrap"):  # after kafka-python's bootstrap timeout
            PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic, settings=s)
