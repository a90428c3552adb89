"""What every fuzz target shares: its failure type, a watchdog, log capture, mutations."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher


class FuzzFailure(AssertionError):
    """An input made the node break one of the invariants a target checks."""


class InputTimeout(FuzzFailure):
    """One input took longer than its target's time bound: a hang or a quadratic path."""


# Seconds one input may take before the watchdog calls it a hang (the long run's
# inputs are at most MAX_INPUT_BYTES; a healthy input takes milliseconds).
INPUT_SECONDS = 10.0
# Longest input a target is given (the engines cut longer ones).
MAX_INPUT_BYTES = 1 << 18


@contextlib.contextmanager
def watchdog(seconds: float | None) -> Iterator[None]:
    """Raise ``InputTimeout`` in the main thread if the body runs longer than ``seconds``.

    SIGALRM through ``setitimer``: a pure-Python loop is interrupted wherever it is.
    No-op off the main thread or with ``seconds`` None (atheris runs its own timer).
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise InputTimeout(f"input still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def captured_log() -> Iterator[list[dict[str, Any]]]:
    """Every twisted.logger event published while the body runs (gossip's and Twisted's)."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def bad_events(events: Sequence[dict[str, Any]]) -> list[str]:
    """Events that mean a bug, not a refusal: critical ones and any carrying a traceback
    (``log.failure``: an unhandled error in a Deferred, in dataReceived, in a responder)."""
    out = []
    for e in events:
        level = e.get("log_level")
        failure = e.get("log_failure")
        if level == LogLevel.critical or failure is not None:
            text = formatEvent(e)
            if failure is not None:
                text += "\n" + failure.getTraceback()
            out.append(text)
    return out


def check_log(events: Sequence[dict[str, Any]]) -> None:
    bad = bad_events(events)
    if bad:
        raise FuzzFailure("logged as a failure:\n" + "\n".join(bad))


def warnings(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


# -- byte-level mutations ------------------------------------------------------
# One mutation is a tuple (kind, position, argument); positions are taken modulo the
# data's length, so any tuple applies to any data (hypothesis shrinks them freely).

INTERESTING = (
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\x80\x00\x00\x00",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # the longest varint
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80",  # a varint that never ends
)
KINDS = ("flip", "set", "insert", "delete", "truncate", "dup", "interesting")
Mutation = tuple[str, int, int]


def apply_mutations(data: bytes, mutations: Sequence[Mutation]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        n = len(buf)
        at = pos % (n + 1)
        if kind == "flip" and n:
            buf[at % n] ^= 1 << (arg % 8)
        elif kind == "set" and n:
            buf[at % n] = arg % 256
        elif kind == "insert":
            buf[at:at] = bytes([arg % 256]) * (1 + arg // 256 % 8)
        elif kind == "delete":
            del buf[at : at + 1 + arg % 64]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "dup":
            piece = buf[at : at + 1 + arg % 256]
            buf[at:at] = piece
        elif kind == "interesting":
            value = INTERESTING[arg % len(INTERESTING)]
            buf[at : at + len(value)] = value
    return bytes(buf[:MAX_INPUT_BYTES])


def random_mutations(rng: random.Random, count: int) -> list[Mutation]:
    return [(rng.choice(KINDS), rng.getrandbits(32), rng.getrandbits(16)) for _ in range(count)]
