"""The on-disk layout under ENCORE_DATA_DIR: the only place its file names are built.

The trainer, the version janitor and serving replicas share this folder; keeping every path in
one place lets the janitor delete exactly what a superseded version left behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataDir:
    """Paths of one data folder (nothing is created until a writer needs it)."""

    root: Path

    @classmethod
    def of(cls, path: str | Path) -> DataDir:
        return cls(Path(path))

    @property
    def checkpoint(self) -> Path:
        """The trainer's play matrix and the offsets it covers."""
        return self.root / "checkpoint.npz"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def artifact(self, version: str) -> Path:
        """A model version's factors and id maps (`.npz`, no pickle)."""
        return self.models / f"{version}.npz"

    @property
    def index(self) -> Path:
        return self.root / "index"

    def index_snapshot(self, version: str, space: str) -> Path:
        """A serving replica's saved HNSW graph of one version and space."""
        return self.index / f"{version}-{space}.bin"

    def index_files(self, version: str) -> list[Path]:
        """Every snapshot and lock file of `version` (what the janitor removes)."""
        return sorted(self.index.glob(f"{version}-*.bin*")) if self.index.is_dir() else []

    def snapshot_versions(self) -> set[str]:
        """Versions that have index files here."""
        if not self.index.is_dir():
            return set()
        return {p.name.rsplit("-", 1)[0] for p in self.index.glob("*-*.bin*")}

    @property
    def spark_tmp(self) -> Path:
        """Parent of the Spark engine's per-run hand-over folders (deleted after each run)."""
        return self.root / "spark-tmp"
