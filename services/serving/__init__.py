"""Serving: HNSW snapshots per model version, kept current from factor-updates, behind the HTTP API."""
