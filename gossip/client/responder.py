"""The node's side of the client AMP protocol: each command is one node call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.protocols.policies import LimitTotalConnectionsFactory
from twisted.python.failure import Failure

from gossip import logs
from gossip.client.commands import (
    IDS_PER_PAGE,
    PAGE_BYTES,
    AmbiguousId,
    BadId,
    Delivered,
    Get,
    ListIds,
    ListMessages,
    MessageRejected,
    NotFound,
    Status,
    Submit,
    SubmitMany,
    Watch,
)
from gossip.core.message import BadIdText, id_text
from gossip.core.state import SubmitRejected
from gossip.net.peer_protocol import set_no_delay
from gossip.store.log import StoreError

if TYPE_CHECKING:
    from gossip.node import GossipNode

# Client connections a node serves at once.
MAX_CLIENT_CONNECTIONS = 1024
# Each page entry costs its id and body plus AMP's per-key framing.
_ENTRY_OVERHEAD = 40


class ClientProtocol(amp.AMP):
    log = logs.logger()

    def __init__(self, node: GossipNode) -> None:
        super().__init__()
        self.node = node
        self._watching = False
        self._watch_at = 0  # next position to push to a watcher
        self._push_paused = False

    # AMP logs every connection at info level; a client per command makes that noise.
    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)
        set_no_delay(transport)
        self.node.clients.add(self)
        if self.node.congested:
            self.reading(False)

    def reading(self, on: bool) -> None:
        """Backpressure from the node: stop or restart reading this client's requests."""
        t: Any = self.transport
        # Under the connection limit our transport is a ProtocolWrapper around TCP's.
        while t is not None and IPushProducer(t, None) is None:
            t = getattr(t, "transport", None)
        producer = IPushProducer(t, None)
        if producer is not None:
            if on:
                producer.resumeProducing()
            else:
                producer.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.node.flush()  # what the submits in this read produced goes out now

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.node.clients.discard(self)
        self.node.watchers.discard(self)
        self._watching = False
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @Submit.responder
    def submit(self, body: str) -> Deferred[dict[str, Any]]:
        # Plain callbacks, not a coroutine: this runs for every submit, and the
        # coroutine's Deferred plumbing cost more than the rest of the command.
        try:
            encoded = body.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageRejected("message is not valid Unicode text") from None
        try:
            stored = self.node.submit(encoded)
        except SubmitRejected as e:
            raise MessageRejected(str(e)) from None
        except StoreError as e:
            raise MessageRejected(f"not stored: {e}") from None
        return stored.addCallbacks(_submitted, _store_failed)

    @SubmitMany.responder
    def submit_many(self, bodies: list[str]) -> Deferred[dict[str, Any]]:
        # AMP bounds the list (one value: at most 65,535 bytes on the wire).
        encoded: list[bytes] = []
        unencodable: list[int] = []
        for i, body in enumerate(bodies):
            try:
                encoded.append(body.encode("utf-8"))
            except UnicodeEncodeError:
                unencodable.append(i)
        try:
            stored = self.node.submit_many(encoded)
        except StoreError as e:
            raise MessageRejected(f"not stored: {e}") from None

        def answer(results: list[tuple[bytes, bool] | str]) -> dict[str, Any]:
            for i in unencodable:
                results.insert(i, "message is not valid Unicode text")
            return _submitted_many(results)

        return stored.addCallbacks(answer, _store_failed)

    @Get.responder
    def get(self, id: str) -> dict[str, Any]:
        try:
            matches = self.node.find(id.strip(), limit=5)
        except BadIdText as e:
            raise BadId(str(e)) from None
        if not matches:
            raise NotFound(f"no message {id} on node {self.node.node_id}")
        if len(matches) > 1:
            shown = ", ".join(id_text(m.id) for m in matches[:4])
            raise AmbiguousId(f"{id} matches several messages: {shown}")
        m = matches[0]
        return {
            "id": id_text(m.id),
            "body": m.text,
            "received_at": m.received_at,
            "path": list(m.path),
        }

    @ListMessages.responder
    def list_messages(self, start: int, limit: int) -> dict[str, Any]:
        total = self.node.message_count()
        start = max(0, start)
        limit = max(1, min(limit, 10_000))
        out: list[dict[str, str]] = []
        used = 0
        pos = start
        for m in self.node.store.scan(start):
            cost = len(m.body) + _ENTRY_OVERHEAD
            if out and (used + cost > PAGE_BYTES or len(out) >= limit):
                break
            out.append({"id": id_text(m.id), "body": m.text})
            used += cost
            pos += 1
        return {"messages": out, "next": pos, "total": total}

    @ListIds.responder
    def list_ids(self, start: int, limit: int) -> dict[str, Any]:
        total = self.node.store.durable_count()
        start = max(0, start)
        ids = self.node.store.ids_from(start, min(max(1, min(limit, IDS_PER_PAGE)), total - start))
        return {"ids": b"".join(ids), "next": start + len(ids), "total": total}

    @Watch.responder
    def watch(self, start: int) -> dict[str, Any]:
        self._watch_at = max(0, start)
        if not self._watching:
            self._watching = True
            # Pushes stop while the client's socket is full and go on from the
            # cursor when it drains: a slow watcher costs no memory here.
            self.transport.registerProducer(self, True)  # type: ignore[union-attr]
            self.node.watchers.add(self)
        self.node.clock.callLater(0, self.push_delivered)  # after this answer
        return {"durable": self.node.store.durable_count()}

    def push_delivered(self) -> None:
        """Send ``Delivered`` for every durable id past the cursor (unless paused)."""
        if not self._watching or self._push_paused or self.transport is None:
            return
        store = self.node.store
        durable = store.durable_count()
        while self._watch_at < durable and not self._push_paused:
            ids = store.ids_from(self._watch_at, min(IDS_PER_PAGE, durable - self._watch_at))
            self.callRemote(Delivered, start=self._watch_at, ids=b"".join(ids))
            self._watch_at += len(ids)

    # IPushProducer for the watch pushes (called by the transport).
    def pauseProducing(self) -> None:
        self._push_paused = True

    def resumeProducing(self) -> None:
        self._push_paused = False
        self.push_delivered()

    def stopProducing(self) -> None:
        self._push_paused = True

    @Status.responder
    def status(self) -> dict[str, Any]:
        return self.node.status()


def _submitted(result: tuple[bytes, bool]) -> dict[str, Any]:
    mid, new = result
    return {"id": id_text(mid), "new": new}


def _submitted_many(results: list[tuple[bytes, bool] | str]) -> dict[str, Any]:
    ids: list[str] = []
    errors: list[str] = []
    for r in results:
        if isinstance(r, str):  # refused: why
            ids.append("")
            errors.append(r)
        else:
            ids.append(id_text(r[0]))
            errors.append("")
    return {"ids": ids, "errors": errors}


def _store_failed(failure: Failure) -> Failure:
    """A submit whose record could not be made durable: one line back to the client."""
    failure.trap(StoreError)
    raise MessageRejected(f"not stored: {failure.value}")


class ClientFactory(LimitTotalConnectionsFactory):
    """Client connections, at most ``MAX_CLIENT_CONNECTIONS`` at once (Twisted's own
    limit: connections over it are closed at once)."""

    noisy = False

    def __init__(self, node: GossipNode) -> None:
        self.node = node
        self.connectionLimit = MAX_CLIENT_CONNECTIONS  # type: ignore[assignment]  # stubs: None
        self.protocol = lambda: ClientProtocol(node)
