#!/opt/gossip/bin/python
"""gossip-healthcheck: is this container's node answering clients?

One AMP ``Status`` round trip to $GOSSIP_HEALTH_HOST (default 127.0.0.1) on port
$GOSSIP_CLIENT_PORT (default 17101), within TIMEOUT_SECONDS. A process that holds its
port but whose reactor is stuck still gets TCP connections accepted by the kernel, so
a bare port check would pass; this one fails. Links that are down do not fail it: a
node cut off from its neighbours is still healthy and reconnects by itself. Prints
one line; exit status 0 when healthy, 1 when not.

Only the standard library, on purpose: importing Twisted costs about a second of CPU,
and health checks of 16 nodes on one small host (or a liveness probe in every pod)
run often. The AMP box format is simple: (2-byte length, key, 2-byte length, value)
pairs, ended by an empty key.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

TIMEOUT_SECONDS = 3.0
MAX_ANSWER_BYTES = 1 << 20  # a Status answer is a few KB


def encode_box(box: dict[bytes, bytes]) -> bytes:
    out = b"".join(
        struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in box.items()
    )
    return out + b"\x00\x00"


def read_box(sock: socket.socket, deadline: float) -> dict[bytes, bytes]:
    buf = b""
    box: dict[bytes, bytes] = {}
    pos = 0
    while True:
        # Parse what has arrived; read more when a length or a field is incomplete.
        while len(buf) - pos >= 2:
            (n,) = struct.unpack_from("!H", buf, pos)
            if n == 0:
                return box
            if len(buf) - pos < 2 + n + 2:
                break
            key = buf[pos + 2 : pos + 2 + n]
            (m,) = struct.unpack_from("!H", buf, pos + 2 + n)
            end = pos + 2 + n + 2 + m
            if len(buf) < end:
                break
            box[key] = buf[pos + 2 + n + 2 : end]
            pos = end
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {TIMEOUT_SECONDS:.0f} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"no answer within {TIMEOUT_SECONDS:.0f} s") from None
        if not chunk:
            raise ConnectionError("the node closed the connection")
        buf += chunk
        if len(buf) > MAX_ANSWER_BYTES:
            raise ValueError("answer too long")


def check(host: str, port: int) -> str:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    with socket.create_connection((host, port), timeout=TIMEOUT_SECONDS) as sock:
        sock.sendall(encode_box({b"_ask": b"1", b"_command": b"Status"}))
        box = read_box(sock, deadline)
    if b"_answer" not in box:
        reason = box.get(b"_error_description", b"no _answer").decode(errors="replace")
        raise ValueError(f"Status refused: {reason}")
    node = box.get(b"node_id", b"?").decode(errors="replace")
    count = box.get(b"message_count", b"?").decode(errors="replace")
    return f"node {node} at {host}:{port} answers: {count} messages"


def main() -> int:
    host = os.environ.get("GOSSIP_HEALTH_HOST", "127.0.0.1")
    try:
        port = int(os.environ.get("GOSSIP_CLIENT_PORT", "17101"))
        print(check(host, port))
    except (OSError, ValueError) as e:
        print(f"unhealthy: {host}:{os.environ.get('GOSSIP_CLIENT_PORT', '17101')}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
