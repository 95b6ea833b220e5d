"""Experiment arms in a serving replica: which model version answers a user, and its snapshot.

The current version's snapshot is the follower's own (kept fresh by `factor-updates`). Every
other version an arm names gets a read-only snapshot of its own, built on the follower's thread
like a version swap; a user in such an arm is folded in per request from their live history
against that version's track factors (the exact solve the speed layer runs for the current
version), so both arms are equally fresh without a second speed-layer pass. Until an arm's
snapshot is ready its users are served, and reported, as the `current` arm.
"""

from __future__ import annotations

import logging
import time

from core.errors import UnknownVersionError
from core.experiments import Experiment
from services.infra.model_store import RedisModelStore
from services.serving.snapshots import Snapshot, SnapshotBuilder

log = logging.getLogger(__name__)
RESOLVE_EVERY_S = 2.0


class ArmSnapshots:
    def __init__(self, experiment: Experiment | None, builder: SnapshotBuilder, models: RedisModelStore) -> None:
        self.experiment, self.builder, self.models = experiment, builder, models
        self.version_of: dict[str, str] = {}  # arm → version it names now
        self.by_version: dict[str, Snapshot] = {}  # snapshots of arm versions other than current
        self._resolved_at = 0.0

    def refresh(self, current: Snapshot | None) -> None:
        """Resolve every arm and build the snapshots missing (on the follower's thread)."""
        if self.experiment is None or time.monotonic() - self._resolved_at < RESOLVE_EVERY_S:
            return
        self._resolved_at = time.monotonic()
        resolved = {arm: v for arm in self.experiment.arm_names if (v := self.models.resolve(arm))}
        wanted = {v for v in resolved.values() if current is None or v != current.version}
        snaps = {v: s for v, s in self.by_version.items() if v in wanted}
        for version in wanted - set(snaps):
            try:
                snaps[version] = self.builder.build(version)
                log.info("experiment %s: version %s ready for its arm", self.experiment.name, version)
            except UnknownVersionError as exc:
                log.warning("experiment %s: %s", self.experiment.name, exc)
        self.by_version, self.version_of = snaps, resolved  # whole dicts replaced: readers see one or the other

    def assign(self, user_id: str, current: Snapshot) -> tuple[str, Snapshot]:
        """(arm, snapshot that answers) for a user; `current` outside an experiment."""
        if self.experiment is None:
            return "current", current
        arm = self.experiment.arm_of(user_id)
        version = self.version_of.get(arm)
        if version is None or version == current.version:
            return (arm if version == current.version else "current"), current
        snap = self.by_version.get(version)
        return (arm, snap) if snap is not None else ("current", current)

    def versions(self) -> set[str]:
        return set(self.by_version)
