"""Plumbing every layer shares: settings, the Redis key schema and Lua scripts, Kafka and
Redis clients, the model store, embedded servers, metrics."""
