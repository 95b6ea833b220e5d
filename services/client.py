"""Public import path of the lookup client (documented in the README; other services use it)."""

from services.serving.client import EncoreClient

__all__ = ["EncoreClient"]
