"""The key=value options of stad's commands beside Hydra's (``stad.predict``, ``stad.export``,
``stad-leaderboard``): parsing, value types, usage text and the device choice. One style for
every command: ``key=value`` as Hydra's overrides, ``--help`` on each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stad.errors import StadError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Option:
    """One ``key=value`` command-line option: how to parse it, its default and its help."""

    parse: Callable[[str], Any]
    default: Any
    help: str


def parse_bool(text: str) -> bool:
    """``true/false``, ``yes/no``, ``1/0`` (any case)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_choice(*choices: str) -> Callable[[str], str]:
    """A parser that accepts one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def optional_path(text: str) -> Path | None:
    """A path, or None for ``none``/``null``/empty."""
    return None if text.strip().lower() in ("", "none", "null") else Path(text).expanduser()


def parse_options(
    argv: Sequence[str], spec: dict[str, Option], command: str, required: Sequence[str] = ()
) -> dict[str, Any]:
    """``key=value`` arguments (as Hydra overrides look) → values by key, defaults filled in.

    Raises:
        StadError: an argument without ``=``, an unknown or repeated key, a value that does not
            parse, or a missing required key; the message lists the known keys.
    """
    known = ", ".join(spec)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.strip().lstrip("+")
        if not sep:
            raise StadError(f"{command}: argument {arg!r} is not key=value; known keys: {known}")
        if key not in spec:
            raise StadError(f"{command}: unknown option {key!r}; known keys: {known}")
        if key in values:
            raise StadError(f"{command}: option {key!r} is given twice")
        try:
            values[key] = spec[key].parse(text)
        except ValueError as err:
            raise StadError(f"{command}: {key}={text!r}: {err} ({spec[key].help})") from None
    missing = [k for k in required if k not in values]
    if missing:
        raise StadError(
            f"{command}: missing {', '.join(f'{k}=...' for k in missing)}; "
            f"usage: python -m {command} " + " ".join(f"{k}=<{k}>" for k in required)
        )
    return {k: values.get(k, opt.default) for k, opt in spec.items()}


def usage(command: str, spec: dict[str, Option], summary: str) -> str:
    """The help text of a key=value command."""
    width = max(len(k) for k in spec)
    lines = [f"usage: python -m {command} key=value ...", "", summary, "", "options:"]
    for key, opt in spec.items():
        shown = str(opt.default).lower() if isinstance(opt.default, bool) else opt.default
        default = "" if opt.default is None else f" (default: {shown})"
        lines.append(f"  {key:<{width}}  {opt.help}{default}")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch  # here: the leaderboard parses options without torch

    if name == "cuda" and not torch.cuda.is_available():
        raise StadError("device=cuda but no CUDA device is available; use device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
