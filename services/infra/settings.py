"""One typed settings object, loaded once from ENCORE_* environment variables."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from core.errors import ConfigError
from core.experiments import Experiment

__all__ = ["ConfigError", "Settings", "configure_logging"]


def configure_logging(level: str) -> None:
    """Encore's log format on stderr (a no-op where logging is set up already)."""
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _s(default: Any, doc: str, **kw: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True)
class Settings:
    """Effective configuration; every field maps to ENCORE_<FIELD NAME IN UPPER CASE>."""

    kafka_bootstrap: str = _s("", "Kafka bootstrap servers; empty = start an embedded broker")
    redis_url: str = _s("", "Redis URL; empty = start an embedded redis-server", secret=True)
    kafka_security_protocol: str = _s(
        "PLAINTEXT", "Kafka security protocol", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    )
    kafka_ca_file: str = _s("", "CA to verify the brokers with (SSL, SASL_SSL); empty: the system's CAs")
    kafka_cert_file: str = _s("", "client certificate for Kafka mutual TLS")
    kafka_key_file: str = _s("", "client private key for Kafka mutual TLS")
    kafka_sasl_mechanism: str = _s(
        "PLAIN", "SASL mechanism (SASL_*)", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
    )
    kafka_username: str = _s("", "SASL user name")
    kafka_password: str = _s("", "SASL password", secret=True)
    kafka_password_file: str = _s("", "file holding the SASL password (first line)")
    plays_topic: str = _s("plays", "topic of play events (key = user id)")
    dlq_topic: str = _s("plays.dlq", "dead-letter topic for invalid play events")
    updates_topic: str = _s("factor-updates", "topic of changed vectors for serving replicas")
    tracks_topic: str = _s("tracks", "compacted topic of the track catalogue (key = track id)")
    tracks_dlq_topic: str = _s("tracks.dlq", "dead-letter topic for invalid catalogue entries")
    impressions_topic: str = _s("impressions", "topic of what personal answers showed (key = user id)")
    log_impressions: bool = _s(True, "serving writes an impression per personal answer (online metrics)")
    experiment_join: bool = _s(
        True, "`encore foldin` joins plays with impressions for the online A/B metrics (off: a fifth more plays/s)"
    )
    join_window_s: float = _s(1800.0, "a play counts for an impression this many seconds after it", min=1.0)
    key_prefix: str = _s("encore:", "prefix of every Redis key")
    plays_partitions: int = _s(4, "partitions of the plays topic when Encore creates it", min=1)
    factors: int = _s(64, "latent factors", min=1, max=1024)
    regularization: float = _s(0.05, "L2 regularization", min=0.0)
    alpha: float = _s(2.0, "confidence scale α", min=0.0)
    epsilon: float = _s(1.0, "ε of log confidence 1 + α·log(1 + plays/ε)", min=1e-9)
    confidence: str = _s("log", "confidence function", choices=("log", "linear"))
    iterations: int = _s(15, "ALS iterations per retrain", min=1)
    solver: str = _s("cg", "ALS solver", choices=("cg", "cholesky"))
    min_ms_played: int = _s(30_000, "plays shorter than this are skips and add no weight", min=0)
    history_cap: int = _s(500, "tracks kept per user history (heaviest first)", min=1)
    track_listeners_cap: int = _s(1000, "recent listeners kept per track for cold start", min=1)
    cold_start_min_listeners: int = _s(3, "listeners before a new track gets a vector", min=1)
    # 10,000 against 5,000 (bench.freshness, throughput, alternated, 6 runs each): one Redis 42,706-52,760
    # against 30,315-46,772 plays/s, Redis Cluster 33,365-41,821 against 30,035-33,572. Only a backlog
    # fills a batch; its apply then holds one Redis for 77-85 ms (26-33 ms at 5,000; INFO commandstats).
    batch_max_events: int = _s(10_000, "fold-in micro-batch: max events", min=1)
    batch_max_ms: int = _s(5, "fold-in micro-batch: max wait in ms", min=1)
    resolve_thread: bool = _s(True, "fold-in: re-solve queued users on a second thread while the next batch is applied")
    max_future_s: float = _s(86_400.0, "events with ts further ahead than this are dead letters")
    max_count: int = _s(1000, "events with count above this are dead letters", min=1)
    retrain_interval_s: float = _s(600.0, "seconds between scheduled retrains", min=1.0)
    retrain_min_new_plays: int = _s(0, "also retrain after this many new plays (0 = off)", min=0)
    decay_half_life_days: float = _s(0.0, "batch layer: a play's weight halves every this many days (0 = off)", min=0.0)
    holdout_fraction: float = _s(0.2, "share of an evaluation user's tracks held out", min=0.01, max=0.9)
    eval_users: int = _s(2000, "users sampled for the holdout (the only users who lose plays to it)", min=1)
    refit_iterations: int = _s(3, "warm ALS iterations on all plays after evaluation (local engine)", min=0)
    tune: bool = _s(True, "search hyperparameters on the holdout at retrain (Optuna)")
    tune_budget_s: float = _s(120.0, "seconds a search may take (the trial running at the limit finishes)", min=0.0)
    tune_trials: int = _s(30, "most trials per search (the Spark engine: at most 3)", min=1)
    tune_every: int = _s(1, "search at every Nth retrain; the others reuse the last winner", min=1)
    experiment: str = _s("", "A/B experiment NAME:ARM=SHARE,... (arms: current, candidate or a version)")
    tune_factors: str = _s("32,48,64,96,128", "factor counts the search may choose (comma-separated)")
    publish_guard: float = _s(0.5, "refuse a model whose precision@10 < guard × current's")
    version_grace_s: float = _s(300.0, "seconds an old model version is kept after a flip")
    data_dir: str = _s("./data", "trainer checkpoints, model artifacts and index snapshots")
    spark_master: str = _s("local[*]", "Spark master URL for --engine spark")
    api_host: str = _s("127.0.0.1", "HTTP API bind address")
    api_port: int = _s(8000, "HTTP API port", min=0, max=65535)
    api_workers: int = _s(0, "`encore serve` worker processes on one port (0 = one per CPU core)", min=0, max=64)
    metrics_port: int = _s(0, "Prometheus port of workers (0 = off)", min=0, max=65535)
    index_ef: int = _s(0, "HNSW search breadth (0 = the smallest reaching ENCORE_INDEX_RECALL)", min=0)
    index_recall: float = _s(
        0.95, "recall@10 vs exact search the auto-chosen ef must reach (95 % lower bound)", min=0.5, max=1.0
    )
    max_n: int = _s(100, "largest n the API accepts", min=1)
    radio_artist_window: int = _s(5, "radio: no artist twice within this many consecutive tracks", min=1, max=100)
    radio_listener_weight: float = _s(0.5, "radio: pull of the listener's taste against the seed's", min=0.0)
    api_tls_cert: str = _s("", "certificate (chain) file: `encore serve` speaks HTTPS")
    api_tls_key: str = _s("", "private key file of ENCORE_API_TLS_CERT")
    api_keys: str = _s("", "read API keys, comma-separated (none set anywhere: the API is open)", secret=True)
    api_keys_file: str = _s("", "file with read API keys, one a line (re-read when it changes)")
    admin_api_keys: str = _s("", "admin API keys, comma-separated (admin endpoints; may also read)", secret=True)
    admin_api_keys_file: str = _s("", "file with admin API keys, one a line (re-read when it changes)")
    redis_timeout_s: float = _s(
        10.0, "timeout of every Redis command and connect (one policy for all clients)", min=0.1
    )
    redis_cluster: str = _s(
        "auto", "Redis Cluster mode: auto (ask the server), true or false", choices=("auto", "true", "false")
    )
    redis_buckets: int = _s(
        64, "hash-tag buckets of per-user state on Redis Cluster (fixed once state is written)", min=1, max=16384
    )
    redis_username: str = _s("", "Redis ACL user (empty: the URL's, else the default user)")
    redis_password: str = _s("", "Redis password (empty: the URL's, if any)", secret=True)
    redis_password_file: str = _s("", "file holding the Redis password (first line)")
    redis_ca_file: str = _s("", "CA certificate(s) to verify Redis with (rediss:// URLs)")
    redis_cert_file: str = _s("", "client certificate for Redis mutual TLS")
    redis_key_file: str = _s("", "client private key for Redis mutual TLS")
    log_level: str = _s("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse ENCORE_* variables; unknown names or bad values raise ConfigError."""
        env = os.environ if env is None else env
        known = {f"ENCORE_{f.name.upper()}": f for f in fields(cls)}
        unknown = sorted(
            k for k in env if k.startswith("ENCORE_") and k not in known and not k.startswith("ENCORE_TEST_")
        )
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; see `encore config`")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name in env:
                values[f.name] = _parse(name, env[name], f)
        return cls(**values)

    @property
    def serve_workers(self) -> int:
        """`encore serve`'s worker processes: ENCORE_API_WORKERS, or one per CPU core."""
        return self.api_workers or os.cpu_count() or 1

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, effective value with secrets masked, description) rows."""
        rows = []
        for f in fields(self):
            value = str(getattr(self, f.name))
            if f.metadata.get("secret") and value:
                value = _masked(value)
            rows.append((f"ENCORE_{f.name.upper()}", value, f.metadata["doc"]))
        return rows


def masked_url(url: str) -> str:
    """`url` without its password (for anything printed or logged)."""
    return _masked(url) if url else url


def _masked(value: str) -> str:
    """A URL keeps all but its credentials; anything else secret shows only how many items."""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}" if "@" in rest else value
    return f"*** ({len([v for v in value.split(',') if v.strip()])} set)"


def _parse(name: str, raw: str, f: Any) -> Any:
    kind = type(f.default)
    if kind is bool:
        word = raw.strip().lower()
        if word not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigError(f"{name}={raw!r}: expected true or false")
        return word in ("true", "1", "yes", "on")
    try:
        value: Any = kind(raw.strip()) if kind is not str else raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {kind.__name__}") from None
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{name}={raw!r}: must be one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{name}={raw!r}: must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{name}={raw!r}: must be <= {meta['max']}")
    if kind is str and name.endswith("_TOPIC") and not value:
        raise ConfigError(f"{name} must not be empty")
    if name == "ENCORE_TUNE_FACTORS":
        tune_factors(value, name)
    if name == "ENCORE_EXPERIMENT":
        Experiment.parse(value)
    return value


def tune_factors(raw: str, name: str = "ENCORE_TUNE_FACTORS") -> tuple[int, ...]:
    """The factor counts a search may choose, parsed and checked."""
    try:
        values = tuple(sorted({int(v) for v in raw.split(",") if v.strip()}))
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected comma-separated integers such as 32,64,128") from None
    if not values or values[0] < 1 or values[-1] > 1024:
        raise ConfigError(f"{name}={raw!r}: expected one or more integers between 1 and 1024")
    return values
