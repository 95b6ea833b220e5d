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
from services.infra.embedded import EmbeddedServers, free_port, spawn, stop_processes, wait_port
from services.infra.settings import Settings
from services.infra.throwaway_ca import make_certificates
from services.produce import PlayPublisher
from tests.integration.helpers import WorkerThread, publish_synthetic_model, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_kafka() -> Iterator[tuple[str, Path]]:
    """(bootstrap of the TLS endpoint, certificate folder)."""
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if stunnel is None or shutil.which("openssl") is None:
        pytest.skip("stunnel4 and openssl are needed (scripts/setup.sh installs them)")
    folder = Path(tempfile.mkdtemp(prefix="encore-kafka-tls-"))
    certs = make_certificates(folder / "certs")
    tls_port = free_port()
    servers = EmbeddedServers.start(kafka=False, redis=False, workdir=str(folder / "broker"))
    servers.start_kafka(advertised_port=tls_port)
    conf = folder / "stunnel.conf"
    conf.write_text(
        "foreground = yes\npid =\n[kafka]\n"
        f"accept = 127.0.0.1:{tls_port}\nconnect = {servers.kafka_bootstrap}\n"
        f"cert = {certs.cert('server')}\nkey = {certs.key('server')}\nCAfile = {certs.ca}\n"
        "verify = 2\n"  # mutual TLS: a client without a certificate from the CA is refused
    )
    proc = spawn([stunnel, str(conf)], str(folder / "stunnel.log"))
    try:
        wait_port(tls_port, proc, "stunnel")
        yield f"127.0.0.1:{tls_port}", folder / "certs"
    finally:
        stop_processes([proc])
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

        def exact() -> bool:
            users = [f"u{u}" for u in range(15)]
            got: Counter[str] = Counter()
            for u, flat in zip(users, store.raw_histories(users), strict=True):
                for k in range(0, len(flat), 2):
                    got[f"{u}|{flat[k].decode()}"] = int(float(flat[k + 1]))
            return got == expected

        assert wait_for(exact, timeout=60)
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
