"""The version janitor: superseded model versions leave Redis *and* the data folder.

A version is kept for `ENCORE_VERSION_GRACE_S` after the one that replaced it was published
(readers that read the version once per request finish on it; `encore model rollback` can
return to it); after that its keys, its artifact and any index snapshots go. Files of versions
Redis no longer knows (left by a crash between the two) are removed too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from services.infra.data_dir import DataDir
from services.infra.model_store import RedisModelStore

log = logging.getLogger(__name__)


class VersionJanitor:
    def __init__(self, models: RedisModelStore, data: DataDir, grace_s: float, pinned: Collection[str] = ()) -> None:
        """`pinned`: versions an experiment names; kept like the current one and the candidate."""
        self.models, self.data, self.grace_s, self.pinned = models, data, grace_s, set(pinned)

    def expired(self, now: float | None = None) -> list[str]:
        """Versions superseded more than `grace_s` ago; never the current one, the candidate or
        a version an experiment names."""
        now = time.time() if now is None else now
        rows = self.models.versions()
        keep = {self.models.current_version(), self.models.candidate_version(), *self.pinned}
        return [
            v
            for (v, _), (_, superseded_at) in zip(rows, rows[1:], strict=False)
            if v not in keep and now - superseded_at > self.grace_s
        ]

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete expired versions and orphaned files; returns the versions removed."""
        gone = self.expired(now)
        for v in gone:
            n = self.models.delete_version(v)
            log.info("janitor: version %s removed (%d keys)", v, n)
        kept = {v for v, _ in self.models.versions()} | set(filter(None, [self.models.current_version()]))
        on_disk = {p.stem for p in self.data.models.glob("*.npz")} if self.data.models.is_dir() else set()
        for v in sorted((on_disk | self.data.snapshot_versions()) - kept):
            self.remove_files(v)
        return gone

    def remove_files(self, version: str) -> None:
        for path in [self.data.artifact(version), *self.data.index_files(version)]:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("janitor: could not remove %s: %s", path, exc)
