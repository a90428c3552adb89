"""Argument types for the commands' argparse parsers: a bad number is one clear line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn


def whole(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An int within [low, high] (either bound may be absent)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        _check(value, low, high)
        return value

    return parse


def real(
    low: float | None = None,
    high: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
) -> Callable[[str], float]:
    """A finite float within [low, high], and strictly above/below the given limits."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        _check(value, low, high)
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be above {above:g}, got {text}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"must be below {below:g}, got {text}")
        return value

    return parse


def _check(value: float, low: float | None, high: float | None) -> None:
    if low is not None and high is not None and not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {low:g}..{high:g}, got {value:g}")
    if low is not None and value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {value:g}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {value:g}")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
