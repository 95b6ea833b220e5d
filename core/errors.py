"""Domain errors; mapped to HTTP status codes or exit codes only at the edge (cli, api).

Every failure a user or operator can cause has its own type here, so the edge can print a
message instead of a traceback and pick a code without parsing text.
"""


class EncoreError(Exception):
    """Base class of Encore's own errors."""


class InvalidPlaysError(EncoreError, ValueError):
    """A play matrix or fold-in batch is malformed (shape, sign, NaN, type)."""


class NotFittedError(EncoreError, ValueError):
    """The model is used before `fit` or `load`."""


class DivergedError(EncoreError, ArithmeticError):
    """Training produced non-finite factors; they are never served."""


class ConfigError(EncoreError):
    """A setting is unknown or its value is invalid, or a command's arguments disagree."""


class CheckpointMismatchError(EncoreError):
    """A checkpoint was built under settings it cannot be reused with (e.g. another half-life)."""


class ModelRejectedError(EncoreError):
    """A newly trained model was refused by the publish guard (holdout precision too low)."""


class NoPlaysError(EncoreError):
    """There is nothing to train on yet."""


class UnknownVersionError(EncoreError, LookupError):
    """A model version is not (or no longer) stored."""


class UnknownTrackError(EncoreError, LookupError):
    """A track is not in the served model."""


class NoModelError(EncoreError):
    """No model has been published or loaded yet."""


class MissingBinaryError(EncoreError):
    """A server binary is not installed; the message says how to install it."""


class FatalError(EncoreError):
    """A long-running component met a fault that retrying cannot fix; it stops loudly."""


class StateRewoundError(EncoreError):
    """Stored offsets went backwards under a writer: the state lost writes (a restore, a
    failover, a flush). The writer rewinds its input to `offsets` (+1) and replays from there."""

    def __init__(self, offsets: dict[int, int]) -> None:
        super().__init__(f"stored offsets went backwards: {offsets}")
        self.offsets = offsets


class CorruptFileError(EncoreError):
    """A checkpoint or model artifact failed its checksum or cannot be read; never loaded."""
