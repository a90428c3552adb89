"""The client token: a secret in a file that both a node and its clients read.

The token is the file's text without surrounding whitespace (so an editor's
final newline does not matter). It must be at least ``MIN_TOKEN_CHARS``
characters: ``gossip-certs`` is not needed for it, any random string does, e.g.
``python -c "import secrets; print(secrets.token_urlsafe(32))" > client.token``.
"""

from __future__ import annotations

import hmac
import os

MIN_TOKEN_CHARS = 16
MAX_TOKEN_BYTES = 4096


class TokenError(Exception):
    """The token file cannot be used; ``str()`` is one line naming the file."""


def read_token(path: str | os.PathLike[str]) -> bytes:
    shown = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise TokenError(f"{shown}: cannot read the client token: {e.strerror or e}") from None
    token = data.strip()
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenError(f"{shown}: a client token is at most {MAX_TOKEN_BYTES} bytes")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"{shown}: the client token must be at least {MIN_TOKEN_CHARS} characters"
            f" (got {len(token)})"
        )
    return token


def token_matches(expected: bytes, given: bytes) -> bool:
    """Compare in constant time (no timing hint of how much of a guess was right)."""
    return hmac.compare_digest(expected, given)
