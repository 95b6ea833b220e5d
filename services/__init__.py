"""Encore's services: everything that talks to Kafka, Redis or HTTP.

Encore's processes share small machines with Redis and the broker. numba's OpenMP threads
spin-wait after each parallel region by default, taking the CPU those servers need (measured
in bench.freshness: one fold-in worker went from ~20k to ~23k plays/s with passive waiting).
Set before numba starts its thread pool; an explicit OMP_WAIT_POLICY wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
