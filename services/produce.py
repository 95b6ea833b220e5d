"""Public import path of the play publisher (documented in the README; other services use it)."""

from services.infra.play_publisher import PlayPublisher

__all__ = ["PlayPublisher"]
