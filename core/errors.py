"""Domain errors of the numeric core; mapped to HTTP or exit codes only at the edge."""


class EncoreError(Exception):
    """Base class of Encore's own errors."""


class InvalidPlaysError(EncoreError, ValueError):
    """A play matrix or fold-in batch is malformed (shape, sign, NaN, type)."""


class NotFittedError(EncoreError, ValueError):
    """The model is used before `fit` or `load`."""


class DivergedError(EncoreError, ArithmeticError):
    """Training produced non-finite factors; they are never served."""
