"""Fuzz target: a node's client port (AMP) fed an arbitrary byte stream.

A real ``GossipNode`` (memory store, fake clock) serves one ``ClientProtocol``
on a ``StringTransport``; the input is what the client sends, in chunks (while
the node has stopped reading, as it does under its flow control, nothing more
is delivered: a socket would not be read either). Whatever arrives, nothing
escapes ``dataReceived``, nothing is logged as critical or with a traceback
(AMP logs a responder's unexpected exception that way and answers it with
``UNKNOWN``), every error answer is one the commands declare, reading always
resumes, the framing buffer stays within one AMP value, and afterwards another
client still submits. On a node with a client token, a connection that never
sent the token stores nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure

from gossip.client import commands
from gossip.client.responder import ClientLimits, ClientProtocol
from gossip.fuzz.harness import FuzzFailure, captured_log, check_log
from gossip.node import GossipNode
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config

NODE = 1
_CONFIG = generate_config(4, name="fuzz")
# Few requests in progress per connection, so that the hold on reading is reached.
LIMITS = ClientLimits(outstanding=4)
CHUNKS = (1, 2, 3, 7, 64, 1000, 1 << 20)
# Error codes a node may answer with: the commands' declared errors, AMP's own for
# an unknown command. ``UNKNOWN`` (an unexpected exception in a responder) is a bug.
DECLARED = {b"UNHANDLED"} | {
    code
    for command in vars(commands).values()
    if isinstance(command, type) and issubclass(command, amp.Command)
    for code in command.errors.values()
}
# Clock turns allowed for a held connection to resume reading.
RESUME_TURNS = 20
# The client token of a node that has one (bit 7 of the input's first byte).
TOKEN = b"fuzz-token"


class AmpRun:
    def __init__(self, token: bytes | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000.0)
        self.store = MemoryStore()
        self.node = GossipNode(_CONFIG, NODE, self.store, self.reactor)
        self.node.client_token = token  # as read from client_token_file

    def connect(self) -> tuple[ClientProtocol, StringTransport]:
        proto = ClientProtocol(self.node, LIMITS)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 50000))
        proto.makeConnection(transport)
        return proto, transport

    def resume(self, transport: StringTransport) -> None:
        for _ in range(RESUME_TURNS):
            if transport.producerState != "paused":
                return
            self.reactor.advance(0.01)
        raise FuzzFailure(f"reading still held after {RESUME_TURNS} clock turns")


def amp_stream(data: bytes) -> None:
    """``data``: a byte (bits 0-6: the chunk size, ``CHUNKS``; bit 7: the node has the
    client token ``TOKEN``), then the bytes the client sends."""
    if not data:
        return
    token = TOKEN if data[0] & 0x80 else None
    run = AmpRun(token)
    chunk = CHUNKS[(data[0] & 0x7F) % len(CHUNKS)]
    stream = data[1:]
    limit = 2 + amp.BinaryBoxProtocol._MAX_VALUE_LENGTH
    with captured_log() as events:
        proto, transport = run.connect()
        for i in range(0, len(stream), chunk):
            if transport.disconnecting:
                break
            run.resume(transport)
            proto.dataReceived(stream[i : i + chunk])
            if len(proto._unprocessed) > limit + (chunk if proto.paused else 0):
                raise FuzzFailure(f"{len(proto._unprocessed)} bytes buffered, over one value")
            run.reactor.advance(0)
        if not transport.disconnecting:
            run.resume(transport)
        run.reactor.advance(1.0)
        if proto._outstanding < 0:
            raise FuzzFailure(f"{proto._outstanding} requests in progress")
        proto.connectionLost(Failure(ConnectionDone()))
        run.reactor.advance(1.0)
        if proto in run.node.watchers:
            raise FuzzFailure("a closed connection is still watching")
        check_log(events)
    check_answers(transport.value())
    if token is not None and token not in stream and len(run.store):
        raise FuzzFailure(f"{len(run.store)} messages stored from a client without the token")
    check_alive(run)


def check_answers(written: bytes) -> None:
    try:
        boxes: list[Any] = amp.parseString(written)
    except Exception as e:
        raise FuzzFailure(f"the node wrote malformed AMP: {e!r}") from e
    for box in boxes:
        if amp.ERROR in box:
            code = box.get(amp.ERROR_CODE)
            if code not in DECLARED:
                raise FuzzFailure(f"undeclared error answer {code!r}: {box!r:.300}")
        elif amp.ANSWER not in box and box.get(amp.COMMAND) != b"Delivered":
            raise FuzzFailure(f"the node sent an unexpected box {box!r:.300}")


def check_alive(run: AmpRun) -> None:
    proto, transport = run.connect()
    box = amp.AmpBox(_command=b"Submit", _ask=b"1", body=b"still alive")
    login = amp.AmpBox(_command=b"Login", _ask=b"0", token=run.node.client_token or b"")
    proto.dataReceived(login.serialize() + box.serialize())
    run.reactor.advance(0)
    answers = amp.parseString(transport.value())
    if not any(b.get(amp.ANSWER) == b"1" and b"id" in b for b in answers):
        raise FuzzFailure(f"node no longer answers a Submit: {answers!r:.300}")
