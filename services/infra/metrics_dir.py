"""Prometheus multiprocess mode for `encore serve`, set up before prometheus_client is imported.

prometheus_client chooses where metric values live (process memory or files in
PROMETHEUS_MULTIPROC_DIR) when it is first imported, and the forked serve workers inherit that
choice from the parent; so the directory is set here, by a module that does not import it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def multiprocess_dir() -> Iterator[None]:
    """Every process started inside this block writes its metrics to one shared directory, and
    a scrape of any of them sums them all."""
    path = tempfile.mkdtemp(prefix="encore-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(path, ignore_errors=True)
