"""The stored message record and its id.

The id is the first 16 bytes of SHA-256 over the UTF-8 body, as the seed design
asks ("msgID: Hash of Message"). Consequences, chosen on purpose: the same text
submitted twice is one message, a retried submit never duplicates, and any node
can check that a peer's id matches its body. 128 bits keep accidental
collisions out of reach (2**64 messages for a 50% chance).

Text form: the id as a 22-character base58 number (no 0/O/I/l), so that a
prefix of the text is a numeric range of ids, as git accepts abbreviated
hashes. Clients are shown the first ``SHORT_ID_CHARS`` characters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from operator import methodcaller

import attrs

ID_BYTES = 16
ID_CHARS = 22  # ceil(128 / log2(58)); even, as id_text writes digits in pairs
SHORT_ID_CHARS = 10  # ~58 bits: collisions need ~10**9 messages
MIN_PREFIX_CHARS = 4

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_DIGIT = {c: i for i, c in enumerate(_ALPHABET)}
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # digit pair d1 * 58 + d0
_PAIR = 58 * 58
_QUAD = _PAIR * _PAIR
_ID_SPACE = 1 << (8 * ID_BYTES)


@attrs.frozen(slots=True)
class Message:
    """One stored message: what every node keeps for every broadcast."""

    id: bytes
    body: bytes
    received_at: float
    # Node ids the message came through before reaching the holder, origin first.
    # Empty at the node it was submitted to.
    path: tuple[int, ...]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def message_id(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:ID_BYTES]


def ids_match(ids: Iterable[bytes], bodies: Iterable[bytes]) -> bool:
    """Whether each of ``ids`` (all ``ID_BYTES`` long) is ``message_id`` of the body
    beside it: the check of a frame's new messages, hashed without a Python call
    per body."""
    digests = map(_DIGEST, map(hashlib.sha256, bodies))
    return all(map(bytes.startswith, digests, ids))


_DIGEST = methodcaller("digest")


def id_text(mid: bytes) -> str:
    """Fixed-width base58 text of an id. It is on every submit's answer, so it is
    unrolled: five divisions by 58**4 (each remainder two digit pairs by the
    table) and the two digits left, half the cost of a loop of pair divisions."""
    n = int.from_bytes(mid, "big")
    n, a = divmod(n, _QUAD)
    n, b = divmod(n, _QUAD)
    n, c = divmod(n, _QUAD)
    n, d = divmod(n, _QUAD)
    n, e = divmod(n, _QUAD)
    p, q = _PAIRS, _PAIR
    # An id of ID_BYTES bytes is below 58**22, so n (the top two digits) is below 58**2.
    return "".join(
        (
            p[n],
            p[e // q],
            p[e % q],
            p[d // q],
            p[d % q],
            p[c // q],
            p[c % q],
            p[b // q],
            p[b % q],
            p[a // q],
            p[a % q],
        )
    )


def short_id(mid: bytes) -> str:
    return id_text(mid)[:SHORT_ID_CHARS]


class BadIdText(ValueError):
    """A client gave text that cannot be (a prefix of) an id."""


def id_range(prefix: str) -> tuple[bytes, bytes]:
    """The ids whose text starts with ``prefix``, as a half-open byte range [lo, hi).

    ``hi`` may be 17 bytes long when the range runs to the top of the id space,
    which still compares greater than every 16-byte id.
    """
    if not MIN_PREFIX_CHARS <= len(prefix) <= ID_CHARS:
        raise BadIdText(
            f"a message id has {MIN_PREFIX_CHARS} to {ID_CHARS} characters, got {len(prefix)}"
        )
    n = 0
    for c in prefix:
        digit = _DIGIT.get(c)
        if digit is None:
            raise BadIdText(f"{c!r} cannot appear in a message id")
        n = n * 58 + digit
    scale = 58 ** (ID_CHARS - len(prefix))
    lo, hi = n * scale, (n + 1) * scale
    if lo >= _ID_SPACE:
        raise BadIdText(f"{prefix!r} is not a valid message id")
    hi_bytes = hi.to_bytes(ID_BYTES, "big") if hi < _ID_SPACE else b"\xff" * ID_BYTES + b"\x00"
    return lo.to_bytes(ID_BYTES, "big"), hi_bytes
