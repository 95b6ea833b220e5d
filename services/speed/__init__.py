"""The speed layer: plays → histories (exactly once) → fresh user and track vectors within a fraction of a second."""
