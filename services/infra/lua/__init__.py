"""Encore's Redis Lua scripts, kept as `.lua` files beside this module.

Each script receives every key it touches in KEYS (never builds one), so it runs unchanged on
one Redis node and, with keys sharing a hash tag, on Redis Cluster.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def source(name: str) -> str:
    """The text of `{name}.lua`."""
    return (files(__name__) / f"{name}.lua").read_text(encoding="utf-8")
