"""Errors a user can cause, each carrying one message that names the cause and the fix."""

from typing import TypeVar

T = TypeVar("T")


class StadError(Exception):
    """A user-facing error: bad input, missing data or weights, an impossible configuration.

    The command-line entry point prints its message (no traceback) and exits non-zero.
    """


class DatasetError(StadError):
    """The dataset is missing, malformed or unreadable."""


class WeightsError(StadError):
    """Requested pretrained weights cannot be found or do not fit the backbone."""


class TrainingError(StadError):
    """Training diverged (NaN/inf loss) or cannot proceed."""


class IncompatibleError(StadError):
    """The configuration combines parts that cannot work together (a method that needs depth on
    an RGB dataset, a backbone a method cannot use). A sweep skips such a job with this message
    instead of failing; a single run stops with it."""


def lookup(registry: dict[str, T], kind: str, name: str) -> T:
    """``registry[name]``, or a StadError that lists the known names of this ``kind``."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise StadError(f"unknown {kind} '{name}'; known {kind}s: {known}") from None
