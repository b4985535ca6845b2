"""The cluster's refusals (no Ray import: ``server/errors.py`` maps them).

- ``OwnerRestarting``: the model's owner actor is (re)starting or was
  unreachable before the call could change anything, or the call is one
  whose retry is harmless (a read, a TrainStep carrying ``expected_step``,
  which the restarted owner deduplicates from its log): UNAVAILABLE with
  the retry-safe trailer, so the client retries it.
- ``OwnerLost``: the owner died while running a mutation that carries no
  ``expected_step``: it may or may not have been logged before the crash,
  so UNAVAILABLE without the trailer (read the model's step, then decide).
"""
from __future__ import annotations

from ..registry import ShuttingDown


class OwnerRestarting(ShuttingDown):
    """UNAVAILABLE, retry-safe (see the module docstring)."""


class OwnerLost(RuntimeError):
    """UNAVAILABLE, not retry-safe (see the module docstring)."""
