"""The text form of message ids: fixed-width base58, and its prefixes as id ranges."""

from __future__ import annotations

import random

import pytest

from gossip.core.message import ID_BYTES, ID_CHARS, id_range, id_text

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58_by_digits(mid: bytes) -> str:
    """The definition, one digit at a time, most significant first, padded to ID_CHARS."""
    n = int.from_bytes(mid, "big")
    digits = []
    for _ in range(ID_CHARS):
        n, r = divmod(n, 58)
        digits.append(ALPHABET[r])
    assert n == 0
    return "".join(reversed(digits))


def edge_ids() -> list[bytes]:
    top = (1 << (8 * ID_BYTES)) - 1
    values = [0, 1, 57, 58, top, top - 1]
    for k in range(1, ID_CHARS):
        power = 58**k
        if power <= top:
            values += [power - 1, power, power + 1]
    return [v.to_bytes(ID_BYTES, "big") for v in values]


def test_id_text_is_the_fixed_width_base58_number_of_the_id() -> None:
    """id_text (unrolled for speed) gives the plain digit-by-digit base58 text, 22
    characters wide, for ids at every digit boundary and for random ones."""
    rng = random.Random(11)
    ids = edge_ids() + [rng.randbytes(ID_BYTES) for _ in range(2000)]
    for mid in ids:
        text = id_text(mid)
        assert text == base58_by_digits(mid)
        assert len(text) == ID_CHARS


@pytest.mark.parametrize("length", [4, 10, 21, ID_CHARS])
def test_a_prefix_of_an_ids_text_is_a_range_holding_the_id(length: int) -> None:
    """Every prefix of id_text(mid) names a range [lo, hi) that contains mid."""
    rng = random.Random(length)
    for mid in edge_ids() + [rng.randbytes(ID_BYTES) for _ in range(200)]:
        lo, hi = id_range(id_text(mid)[:length])
        assert lo <= mid < hi
