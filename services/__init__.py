"""Encore's services: everything that talks to Kafka, Redis or HTTP, laid out by layer.

    cli/      the `encore` command and the composition root (`cli/root.py`)
    speed/    fold-in: histories exactly once, re-solves, the consumer loop
    batch/    ingest + checkpoint, retrain, engines, version janitor, the trainer loop
    serving/  snapshots, the update follower, queries, the HTTP API, the lookup client
    infra/    settings, Redis keys and Lua, Kafka and Redis clients, embedded servers, metrics

Imports point down only: cli → {speed, batch, serving} → infra → core. Importing any module
connects to nothing and changes no process-wide setting. `services.client.EncoreClient` and
`services.produce.PlayPublisher` are the public import paths other services use.
"""
