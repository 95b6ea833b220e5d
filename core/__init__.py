"""Encore's numeric and domain core: pure code, no Kafka, Redis or HTTP."""
