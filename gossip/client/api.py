"""Talking to a node from Python: a Deferred API for Twisted code, a blocking one for scripts.

Twisted code::

    client = await GossipClient.connect_endpoint(reactor, "tcp:host=127.0.0.1:port=17101")
    mid = await client.submit_message("Apple")
    ids = await client.submit_messages(["Apple", "Banana"])  # one SubmitMany per 60 KB
    bodies = await client.get_messages()

Scripts::

    from gossip.client.api import submit_message, submit_messages, get_messages
    mid = submit_message("Apple", node=1)
    ids = submit_messages(["Apple", "Banana"], node=1)
    bodies = get_messages(node=5)

The blocking functions run Twisted's reactor in a daemon thread and wait on it
with ``blockingCallFromThread`` (Twisted's own tool for this), so do not call
them from code that already runs a reactor.

Credentials: a node with a ``client_token_file`` needs its token (``Login``)
before a submit, and before reads unless ``client_read_without_token``.
``connect_node`` and the blocking functions read the token from the file the
cluster file names for that node, or from ``token_file=``; ``connect_endpoint``
takes the token itself (``token=``).

Errors: ``NodeUnreachable`` (cannot connect), ``NodeClosedConnection`` (the node
closed the connection before answering: it serves too many client connections,
this one was idle too long, or it stopped; connect again later), ``NodeBusy``
from a submit (the node takes no new submits for now; retry later),
``RateLimited`` (over a submit rate; retry later), ``NotAuthenticated`` (no or a
wrong client token), ``TokenError`` (a token file named by ``token_file=``
cannot be read), ``MessageRejected`` (also raised before sending for a message
that is not valid UTF-8 -- such as ``str`` from ``sys.argv`` holding undecodable
bytes as surrogates -- empty, or over the size limit), ``NotFound``,
``AmbiguousId``, ``BadId`` and ``BadRequest`` (from ``gossip.client.commands``),
each with a one-line text.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    FirstError,
    TimeoutError,
    gatherResults,
)
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectingCancelledError, ConnectionClosed
from twisted.protocols import amp
from twisted.python.failure import Failure

from gossip.client.commands import (
    BATCH_BYTES,
    MAX_BODY_LIMIT,
    Arrivals,
    Delivered,
    Get,
    ListMessages,
    Login,
    MessageRejected,
    NotAuthenticated,
    RateLimited,
    Status,
    Submit,
    SubmitMany,
    Watch,
)
from gossip.client.tokens import TokenError, read_token
from gossip.config import ClusterConfig, address_description, load_config
from gossip.core.message import ID_BYTES
from gossip.locations import default_config
from gossip.net.peer_protocol import set_no_delay

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
PAGE_LIMIT = 2000
# SubmitMany calls one GossipClient keeps in flight for ``submit_messages``; further
# batches wait here for an answer (the node reads no more from a connection with
# client_max_outstanding requests in progress: this keeps well under it).
MAX_BATCHES_IN_FLIGHT = 8


@attrs.frozen
class StoredMessage:
    id: str
    body: str
    received_at: float
    path: tuple[int, ...]
    # How this node got it and the redundant copies since; what the node reports about
    # its copy, not part of the message (left out of equality). "" / -1: not known.
    via: str = attrs.field(default="", eq=False)
    duplicates: int = attrs.field(default=-1, eq=False)


class ClientAMP(amp.AMP):
    """The client's end: answers the pushes a node sends to a watcher."""

    def __init__(self) -> None:
        super().__init__()
        self.on_delivered: Callable[[int, list[bytes]], None] | None = None

    @Delivered.responder
    def delivered(self, start: int, ids: bytes) -> dict[str, Any]:
        if self.on_delivered is not None:
            self.on_delivered(start, [ids[i : i + ID_BYTES] for i in range(0, len(ids), ID_BYTES)])
        return {}


__all__ = [
    "GossipClient",
    "MessageRejected",
    "NodeClosedConnection",
    "NodeUnreachable",
    "NotAuthenticated",
    "RateLimited",
    "StoredMessage",
    "TokenError",
    "get_message",
    "get_messages",
    "message_problem",
    "submit_message",
    "submit_messages",
]


def message_problem(message: str, max_bytes: int = MAX_BODY_LIMIT) -> str | None:
    """Why a node would refuse ``message`` (checked before sending), or None."""
    try:
        size = len(message.encode("utf-8"))
    except UnicodeEncodeError as e:
        return (
            f"message is not valid UTF-8 text (undecodable byte or lone surrogate at"
            f" character {e.start})"
        )
    if not size:
        return "message is empty"
    if size > max_bytes:
        return f"message is {size} bytes, over the limit of {max_bytes}"
    return None


def _answer_batch(r: dict[str, Any], batch: list[tuple[str, Deferred[str]]]) -> None:
    for (_, d), mid, error in zip(batch, r["ids"], r["errors"], strict=True):
        if error:
            limited = "rate limit" in error
            d.errback(RateLimited(error) if limited else MessageRejected(error))
        else:
            d.callback(str(mid))


def _fail_batch(failure: Failure, batch: list[tuple[str, Deferred[str]]]) -> None:
    for _, d in batch:
        d.errback(failure)


def batches(messages: Sequence[str], max_bytes: int = BATCH_BYTES) -> list[list[str]]:
    """``messages`` cut, in order, into lists whose bodies (each with its 2-byte length
    in the AMP value) stay within ``max_bytes``: one ``SubmitMany`` each."""
    out: list[list[str]] = []
    current: list[str] = []
    used = 0
    for m in messages:
        cost = len(m.encode("utf-8")) + 2
        if current and used + cost > max_bytes:
            out.append(current)
            current, used = [], 0
        current.append(m)
        used += cost
    if current:
        out.append(current)
    return out


def _batch_ids(r: dict[str, Any], first: int, total: int) -> list[str]:
    """The ids of one SubmitMany answer; raises for the first body the node refused,
    naming its position among all ``total`` (the rest of the batch was stored)."""
    for k, (mid, error) in enumerate(zip(r["ids"], r["errors"], strict=True)):
        if error:
            text = f"message {first + k + 1} of {total}: {error}"
            raise RateLimited(text) if "rate limit" in error else MessageRejected(text)
        if not mid:  # pragma: no cover - a node answers an id or an error
            raise MessageRejected(f"message {first + k + 1} of {total}: no id in the answer")
    return [str(mid) for mid in r["ids"]]


class NodeUnreachable(ConnectionError):
    """The node could not be reached; ``str()`` names it and its address."""


class NodeClosedConnection(ConnectionError):
    """The node closed the connection before answering: it serves as many client
    connections as it allows (in total or from this address), the connection was
    idle too long, or the node stopped. ``str()`` names the node; connect again later."""


class GossipClient:
    """One AMP connection to one node (``name`` says which in error texts)."""

    def __init__(
        self,
        proto: ClientAMP,
        address: str,
        reactor: Any = None,
        name: str | None = None,
        max_message_bytes: int = MAX_BODY_LIMIT,
    ) -> None:
        self.proto = proto
        self.address = address
        self.name = name or f"the node at {address}"
        # Messages over this are refused here, before sending (the cluster's limit when
        # known, else the largest any node may be configured with).
        self.max_message_bytes = max_message_bytes
        # Added to a NotAuthenticated text: why no token was sent (an unreadable file).
        self.token_note = ""
        # With a reactor, the submits made in one reactor turn go out as one
        # SubmitMany: a round trip per message costs the node (and us) more than
        # storing and relaying it. Without one, each is its own Submit.
        self._reactor = reactor
        self._batch: list[tuple[str, Deferred[str]]] = []
        self._batch_bytes = 0
        self._batch_call: Any = None
        # Bounds the SubmitMany calls ``submit_messages`` has in flight.
        self._in_flight = DeferredSemaphore(MAX_BATCHES_IN_FLIGHT)

    @classmethod
    async def connect_endpoint(
        cls,
        reactor: Any,
        description: str,
        timeout: float = CONNECT_TIMEOUT,
        name: str | None = None,
        token: bytes | None = None,
        max_message_bytes: int = MAX_BODY_LIMIT,
    ) -> GossipClient:
        """Connect to the node at a client endpoint description (a ``client_address``)
        and, with ``token``, log in (raises NotAuthenticated for a wrong one)."""
        try:
            endpoint = clientFromString(reactor, description)
            attempt = connectProtocol(endpoint, ClientAMP())
            proto = await attempt.addTimeout(timeout, reactor)
        except (ConnectingCancelledError, TimeoutError):
            raise NodeUnreachable(
                f"{description} is not reachable: no connection within {timeout:g} s"
            ) from None
        except Exception as e:
            raise NodeUnreachable(f"{description} is not reachable: {_reason(e)}") from None
        set_no_delay(proto.transport)
        client = cls(proto, description, reactor, name, max_message_bytes)
        if token is not None:
            try:
                await client.login(token).addTimeout(timeout, reactor)
            except BaseException:
                client.close()
                raise
        return client

    @classmethod
    async def connect(
        cls,
        reactor: Any,
        host: str,
        port: int,
        timeout: float = CONNECT_TIMEOUT,
        name: str | None = None,
    ) -> GossipClient:
        """Connect to ``host``:``port`` over TCP (host names are resolved now)."""
        return await cls.connect_endpoint(
            reactor, address_description(host, port), timeout, name=name
        )

    @classmethod
    async def connect_node(
        cls,
        reactor: Any,
        node: int,
        config: ClusterConfig | str | Path | None = None,
        timeout: float = CONNECT_TIMEOUT,
        token_file: str | Path | None = None,
    ) -> GossipClient:
        """Connect to node ``node`` at its ``client_address`` in the cluster file and log
        in with the client token from ``token_file`` (raises TokenError if unreadable),
        else from the file the cluster file names for that node (if this process can
        read it: reading may not need it)."""
        cluster = _config(config)
        spec = cluster.node(node)
        where = f"node {node} at {spec.client_address}"
        token, note = client_token(cluster, node, token_file)
        try:
            client = await cls.connect_endpoint(
                reactor,
                spec.client_address,
                timeout,
                name=where,
                token=token,
                max_message_bytes=cluster.max_message_bytes,
            )
        except NodeUnreachable as e:
            raise NodeUnreachable(f"node {node} at {e}") from None
        client.token_note = note
        return client

    def login(self, token: bytes) -> Deferred[dict[str, Any]]:
        """Present the client token (see ``Login``)."""
        return self._call(Login, token=token)

    def close(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.loseConnection()

    def _call(self, command: type[amp.Command], **arguments: Any) -> Deferred[dict[str, Any]]:
        sent: Deferred[dict[str, Any]] = self.proto.callRemote(command, **arguments)
        sent.addErrback(self._closed_early)
        if self.token_note:
            sent.addErrback(self._explain_refusal)
        return sent

    def _explain_refusal(self, failure: Failure) -> Failure:
        failure.trap(NotAuthenticated)
        raise NotAuthenticated(f"{failure.value} ({self.token_note})")

    def _closed_early(self, failure: Failure) -> Failure:
        failure.trap(ConnectionClosed)  # ConnectionDone, ConnectionLost
        raise NodeClosedConnection(
            f"{self.name} closed the connection before answering (too many client"
            " connections, this one idle too long, or the node stopped)"
        )

    async def submit_message(self, message: str) -> str:
        """Submit ``message``; returns its full id once the node has stored it. A message
        the node would refuse (not UTF-8, empty, too large) raises MessageRejected here,
        before anything is sent."""
        problem = message_problem(message, self.max_message_bytes)
        if problem is not None:
            raise MessageRejected(problem)
        size = len(message.encode("utf-8"))
        if self._reactor is None or size > BATCH_BYTES // 4:
            return await self._submit_one(message)
        if self._batch_bytes + size > BATCH_BYTES:
            self._send_batch()
        d: Deferred[str] = Deferred()
        self._batch.append((message, d))
        self._batch_bytes += size + 2
        if self._batch_call is None:
            self._batch_call = self._reactor.callLater(0, self._send_batch)
        return await d

    async def submit_messages(self, messages: Sequence[str]) -> list[str]:
        """Submit many messages: one ``SubmitMany`` per ``BATCH_BYTES`` of bodies, at most
        ``MAX_BATCHES_IN_FLIGHT`` of them in flight; returns every full id, in order, once
        the node has stored them all (durably under its fsync policy). A message the node
        would refuse (not UTF-8, empty, too large) raises MessageRejected naming its
        position before anything is sent. A refusal by the node (``RateLimited``,
        ``MessageRejected``; ``NodeBusy`` for a whole batch) raises naming the first
        refused message; the others may be stored, and submitting the same list again
        is safe: ids are content hashes, so a message is never stored twice."""
        total = len(messages)
        for k, m in enumerate(messages):
            problem = message_problem(m, self.max_message_bytes)
            if problem is not None:
                raise MessageRejected(f"message {k + 1} of {total}: {problem}")
        calls: list[Deferred[list[str]]] = []
        first = 0
        for batch in batches(messages):
            calls.append(self._in_flight.run(self._submit_batch, batch, first, total))
            first += len(batch)
        try:
            answers: list[list[str]] = await gatherResults(calls, consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()
            raise  # not reached
        return [mid for answer in answers for mid in answer]

    def _submit_batch(self, batch: list[str], first: int, total: int) -> Deferred[list[str]]:
        sent = self._call(SubmitMany, bodies=batch)
        return sent.addCallback(_batch_ids, first, total)

    def _submit_one(self, message: str) -> Deferred[str]:
        return self._call(Submit, body=message).addCallback(lambda r: str(r["id"]))

    def _send_batch(self) -> None:
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        self._batch_call = None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch:
            return
        if len(batch) == 1:
            message, d = batch[0]
            self._submit_one(message).chainDeferred(d)
            return
        # Counted with submit_messages' calls: at most MAX_BATCHES_IN_FLIGHT on the wire.
        # A batch that cannot be encoded fails here too: every waiting caller hears it.
        many = self._in_flight.run(self._call, SubmitMany, bodies=[m for m, _ in batch])
        many.addCallbacks(_answer_batch, _fail_batch, callbackArgs=(batch,), errbackArgs=(batch,))

    async def get_message(self, msg_id: str) -> StoredMessage:
        """The message with this id or unique id prefix (raises NotFound, AmbiguousId, BadId)."""
        r = await self._call(Get, id=msg_id)
        return StoredMessage(
            r["id"],
            r["body"],
            r["received_at"],
            tuple(r["path"]),
            r.get("via") or "",
            r.get("duplicates", -1) if r.get("duplicates") is not None else -1,
        )

    async def arrivals(self, since: float) -> list[dict[str, Any]]:
        """Every message the node stored at or after ``since`` (its clock), newest first:
        id, received_at, path, via, duplicates, size (see the ``Arrivals`` command)."""
        out: list[dict[str, Any]] = []
        before = -1
        while True:
            r = await self._call(Arrivals, since=since, before=before)
            out.extend(dict(a) for a in r["arrivals"])
            before = r["next"]
            if before < 0:
                return out

    async def iter_pages(self) -> AsyncIterator[list[tuple[str, str]]]:
        """Every (id, body) the node holds, a page at a time, in the node's arrival order."""
        start = 0
        while True:
            r = await self._call(ListMessages, start=start, limit=PAGE_LIMIT)
            page = [(m["id"], m["body"]) for m in r["messages"]]
            if page:
                yield page
            if not page or r["next"] >= r["total"]:
                return
            start = r["next"]

    async def get_messages(self) -> list[str]:
        out: list[str] = []
        async for page in self.iter_pages():
            out.extend(body for _, body in page)
        return out

    async def watch(self, on_delivered: Callable[[int, list[bytes]], None], start: int = 0) -> int:
        """Follow the node: ``on_delivered(position, raw ids)`` is called for the ids it
        holds durably from ``start`` on, at once for those held and then as they
        come, until the connection closes. Returns the count held durably now."""
        self.proto.on_delivered = on_delivered
        r = await self._call(Watch, start=start)
        return int(r["durable"])

    async def status(self) -> dict[str, Any]:
        return dict(await self._call(Status))


def _reason(e: BaseException) -> str:
    text = str(e).strip().rstrip(".")
    return text.rsplit(": ", 1)[-1] if text else type(e).__name__


def client_token(
    config: ClusterConfig, node: int, token_file: str | Path | None = None
) -> tuple[bytes | None, str]:
    """(token, note): the token from ``token_file`` (TokenError if unreadable), else from
    the file the cluster file names for ``node``; the note says why none was read."""
    if token_file is not None:
        return read_token(token_file), ""
    path = config.client_token_path(node)
    if path is None:
        return None, ""
    try:
        return read_token(path), ""
    except TokenError as e:
        return None, f"no token sent: {e}"


def _config(config: ClusterConfig | str | Path | None) -> ClusterConfig:
    if isinstance(config, ClusterConfig):
        return config
    return load_config(config if config is not None else default_config())


# -- blocking form -----------------------------------------------------------

_reactor_lock = threading.Lock()
_reactor_thread: threading.Thread | None = None


def _blocking(fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(reactor)`` on a reactor in a background thread and wait for its result."""
    from twisted.internet import reactor
    from twisted.internet.threads import blockingCallFromThread

    global _reactor_thread
    with _reactor_lock:
        if _reactor_thread is None:
            _reactor_thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="gossip-reactor",
                daemon=True,
            )
            _reactor_thread.start()

    def call() -> Deferred[T]:
        return Deferred.fromCoroutine(_as_coroutine(fn(reactor)))

    result: T = blockingCallFromThread(cast(Any, reactor), cast(Any, call))
    return result


async def _as_coroutine(aw: Awaitable[T]) -> T:
    return await aw


async def _with_node(
    reactor: Any,
    node: int,
    config: Any,
    op: Callable[[GossipClient], Awaitable[T]],
    token_file: str | Path | None = None,
) -> T:
    client = await GossipClient.connect_node(reactor, node, config, token_file=token_file)
    try:
        return await op(client)
    finally:
        client.close()


def submit_message(
    message: str,
    node: int = 1,
    config: ClusterConfig | str | Path | None = None,
    token_file: str | Path | None = None,
) -> str:
    problem = message_problem(message)  # before any reactor or connection
    if problem is not None:
        raise MessageRejected(problem)
    return _blocking(
        lambda r: _with_node(r, node, config, lambda c: c.submit_message(message), token_file)
    )


def submit_messages(
    messages: Sequence[str],
    node: int = 1,
    config: ClusterConfig | str | Path | None = None,
    token_file: str | Path | None = None,
) -> list[str]:
    """Submit many messages on one connection (see ``GossipClient.submit_messages``)."""
    for k, m in enumerate(messages):  # before any reactor or connection
        problem = message_problem(m)
        if problem is not None:
            raise MessageRejected(f"message {k + 1} of {len(messages)}: {problem}")
    return _blocking(
        lambda r: _with_node(r, node, config, lambda c: c.submit_messages(messages), token_file)
    )


def get_messages(
    node: int = 1,
    config: ClusterConfig | str | Path | None = None,
    token_file: str | Path | None = None,
) -> list[str]:
    return _blocking(lambda r: _with_node(r, node, config, lambda c: c.get_messages(), token_file))


def get_message(
    msg_id: str,
    node: int = 1,
    config: ClusterConfig | str | Path | None = None,
    token_file: str | Path | None = None,
) -> StoredMessage:
    return _blocking(
        lambda r: _with_node(r, node, config, lambda c: c.get_message(msg_id), token_file)
    )
