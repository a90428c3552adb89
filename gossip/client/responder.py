"""The node's side of the client AMP protocol: each command is one node call.

The client port is bounded so that no client can take it from the others: a
cap on connections in total and per source address, an idle timeout, a cap on
requests in progress per connection, and no reading from a connection whose
answers are not being read (see ``ClientLimits``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.protocols import amp
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gossip import logs, settings
from gossip.client.commands import (
    ARRIVALS_PER_PAGE,
    IDS_PER_PAGE,
    PAGE_BYTES,
    AmbiguousId,
    Arrivals,
    BadId,
    Delivered,
    Get,
    ListIds,
    ListMessages,
    Login,
    MessageRejected,
    NodeBusy,
    NotAuthenticated,
    NotFound,
    RateLimited,
    Status,
    Submit,
    SubmitMany,
    Watch,
)
from gossip.client.tokens import token_matches
from gossip.config import ClusterConfig
from gossip.core.message import BadIdText, id_text
from gossip.core.rate import TokenBucket
from gossip.core.state import OriginRateLimited, SubmitRejected
from gossip.log_guard import LogThrottle, shown
from gossip.net.peer_protocol import set_no_delay
from gossip.store.log import StoreError
from gossip.submit_gate import SubmitBusy

if TYPE_CHECKING:
    from gossip.node import GossipNode


@attrs.frozen
class ClientLimits:
    """Bounds of the client port. The defaults are the cluster settings' (see
    ``gossip.settings``; ``from_config`` reads a cluster file's); tests pass smaller ones."""

    # Client connections served at once, and from one source address (fewer, so one
    # host cannot take every place; clients on the node's own host share one address).
    connections: int = settings.CLIENT_MAX_CONNECTIONS.default
    per_source: int = settings.CLIENT_MAX_PER_SOURCE.default
    # A connection with no request in progress and no Watch is closed after this long.
    idle_timeout: float = settings.CLIENT_IDLE_TIMEOUT.default
    # Requests one connection may have in progress; over it the node reads no more from
    # that connection until answers went out (AMP answers each as it completes).
    outstanding: int = settings.CLIENT_MAX_OUTSTANDING.default
    # Bytes of the request being received (an unfinished AMP box): over it the
    # connection is closed, so a client that never ends a box cannot grow memory.
    buffered_bytes: int = settings.CLIENT_MAX_BUFFERED_BYTES.default
    # Connections following the node (Watch) at once.
    watchers: int = settings.CLIENT_MAX_WATCHERS.default
    # Submits per second per connection, and the burst (token bucket).
    submit_rate: float = settings.CLIENT_SUBMIT_RATE.default
    submit_burst: float = settings.CLIENT_SUBMIT_BURST.default
    # With a client token: may a connection that has not logged in read?
    read_without_token: bool = settings.CLIENT_READ_WITHOUT_TOKEN.default
    # At most one log line per this many seconds for refused connections and bad requests.
    log_interval: float = 10.0

    @classmethod
    def from_config(cls, config: ClusterConfig) -> ClientLimits:
        return cls(
            connections=config.client_max_connections,
            per_source=config.client_max_per_source,
            idle_timeout=config.client_idle_timeout,
            outstanding=config.client_max_outstanding,
            buffered_bytes=config.client_max_buffered_bytes,
            watchers=config.client_max_watchers,
            submit_rate=config.client_submit_rate,
            submit_burst=config.client_submit_burst,
            read_without_token=config.client_read_without_token,
        )


# Commands a connection may use before Login: Login itself always; reading only with
# client_read_without_token.
_ALWAYS_OPEN = frozenset({Login.commandName})
_READS = frozenset(c.commandName for c in (Get, ListIds, ListMessages, Watch, Status))


# Each page entry costs its id and body plus AMP's per-key framing.
_ENTRY_OVERHEAD = 40
# Why reading a connection is held: its socket's send buffer is full, or too many of
# its requests are in progress.
_WRITE_FULL = "write-full"
_TOO_MANY_REQUESTS = "requests"


@implementer(IPushProducer)
class _ConnectionFlow:
    """The one producer a client connection registers with its transport. While the
    socket's send buffer is full the node reads no more requests from it (their answers
    would only queue here) and pauses its Watch pushes; both go on when it drains."""

    def __init__(self, proto: ClientProtocol) -> None:
        self.proto = proto

    def pauseProducing(self) -> None:
        self.proto.write_full(True)

    def resumeProducing(self) -> None:
        self.proto.write_full(False)

    def stopProducing(self) -> None:
        self.proto.write_full(True)


class ClientProtocol(amp.AMP, TimeoutMixin):
    log = logs.logger()

    def __init__(
        self,
        node: GossipNode,
        limits: ClientLimits = ClientLimits(),  # frozen: one shared default
        on_close: Callable[[], None] | None = None,
        bad_requests: LogThrottle | None = None,
    ) -> None:
        super().__init__()
        self.node = node
        self.limits = limits
        self._on_close = on_close
        self._bad_requests = bad_requests or LogThrottle(node.clock, limits.log_interval)
        self._watching = False
        self._watch_at = 0  # next position to push to a watcher
        self._write_full = False
        self._holds: set[str] = set()  # why reading is stopped (empty: reading)
        self._resume_call: IDelayedCall | None = None
        self._outstanding = 0  # requests received and not yet answered
        self._box_bytes = 0  # bytes of the AMP box being received
        # Logged in with the node's client token (or the node has none).
        self.authenticated = node.client_token is None
        self._submits = TokenBucket(limits.submit_rate, limits.submit_burst)
        # Submit requests of the read being parsed, entered into the node together at
        # its end (bounded by the read: ``limits.outstanding`` requests at most).
        self._read_submits: list[tuple[bytes, Deferred[dict[str, Any]]]] = []
        self._in_read = False

    # AMP logs every connection at info level; a client per command makes that noise.
    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)
        set_no_delay(transport)
        transport.registerProducer(_ConnectionFlow(self), True)
        self._idle_check()

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's default schedules on the global reactor; use the node's clock.
        return self.node.clock.callLater(period, func)

    def dataReceived(self, data: bytes) -> None:
        self._in_read = True
        try:
            super().dataReceived(data)
        finally:
            self._in_read = False
        if self._read_submits:
            self._submit_read()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
        self.node.watchers.discard(self)
        self.node.following.discard(self)
        self._watching = False
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    # -- flow control --------------------------------------------------------

    def write_full(self, full: bool) -> None:
        """The transport's send buffer filled up (True) or drained (False)."""
        if full == self._write_full:
            return
        self._write_full = full
        if full:
            self._hold(_WRITE_FULL)
            self.node.watchers.discard(self)
        else:
            self._release(_WRITE_FULL)
            if self._watching and self.transport is not None:
                self.node.watcher_ready(self)

    def _hold(self, reason: str) -> None:
        if not self._holds and self.transport is not None:
            # ``paused`` is IntNStringReceiver's own flag: parse no further box of what
            # was already read; pausing the transport reads nothing more from the socket.
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._holds.add(reason)

    def _release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and self._resume_call is None and self.transport is not None:
            # On a later turn: this may run inside the parsing that must not re-enter.
            self._resume_call = self.node.clock.callLater(0, self._resume_reading)

    def _resume_reading(self) -> None:
        self._resume_call = None
        if self._holds or self.transport is None:
            return
        self.paused = False
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.dataReceived(b"")  # the boxes read before the hold

    def _idle_check(self) -> None:
        """Run the idle countdown only while nothing is in progress and nothing watched."""
        if self._watching or self._outstanding:
            self.setTimeout(None)
        else:
            self.setTimeout(self.limits.idle_timeout)  # (re)starts the countdown

    def timeoutConnection(self) -> None:
        self.log.debug(
            "closing a client connection idle for {seconds:g} s",
            node=self.node.node_id,
            seconds=self.limits.idle_timeout,
        )
        if self.transport is not None:
            # Nothing is owed to it: do not wait for it to read what is buffered.
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- requests and answers --------------------------------------------------

    def proto_value(self, string: bytes) -> str:
        # Every key and value of the box being received counts until the box ends: a
        # client that never ends one is cut off at limits.buffered_bytes.
        self._box_bytes += len(string) + len(self._currentKey or b"") + 4
        if self._box_bytes > self.limits.buffered_bytes and self.transport is not None:
            self._bad_request("(unfinished)", f"a request over {self.limits.buffered_bytes} bytes")
            self.transport.abortConnection()  # type: ignore[attr-defined]
            self.paused = True  # parse nothing more of what was read
        return super().proto_value(string)  # type: ignore[no-any-return]

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._box_bytes = 0
        if amp.COMMAND not in box or amp.ANSWER in box or amp.ERROR in box:
            # Clients only ask: the node never asks them anything that wants an answer
            # (AMP would look an answer's id up among our questions and raise KeyError).
            self._bad_request("(none)", "a box that is not a command")
            return
        if amp.ASK in box:
            self._outstanding += 1
            if self._outstanding >= self.limits.outstanding:
                self._hold(_TOO_MANY_REQUESTS)
        self._idle_check()
        if self._read_submits and box[amp.COMMAND] != Submit.commandName:
            self._submit_read()  # requests take effect in order: the Submits before this
        super().ampBoxReceived(box)

    def sendBox(self, box: amp.AmpBox) -> None:
        if self.transport is not None and (amp.ANSWER in box or amp.ERROR in box):
            self._outstanding -= 1
            if self._outstanding < self.limits.outstanding:
                self._release(_TOO_MANY_REQUESTS)
            self._idle_check()
        super().sendBox(box)

    def locateResponder(self, name: bytes) -> Callable[[amp.AmpBox], Deferred[Any]] | None:
        if not name.isascii():  # AMP's own lookup decodes the name as ASCII and raises
            return None
        responder = super().locateResponder(name)
        if responder is None:
            return None
        readable = name in _READS and self.limits.read_without_token
        if not self.authenticated and name not in _ALWAYS_OPEN and not readable:
            return self._not_authenticated

        def parse_then_answer(box: amp.AmpBox) -> Deferred[Any]:
            try:
                return responder(box)  # type: ignore[no-any-return]
            except Exception as e:
                # Only parsing the arguments raises here: the responder's own errors
                # come back in its Deferred.
                command, why = shown(name.decode("ascii", "replace"), 40), _argument_error(e)
                self._bad_request(command, why)
                return fail(amp.RemoteAmpError(b"BAD_REQUEST", f"bad {command} request: {why}"))

        return parse_then_answer

    def unhandledError(self, failure: Failure) -> None:
        # A declared error (BadRequest, a refused submit) for a request sent without
        # asking for an answer: the client chose not to hear it. Anything else is a
        # bug here, for AMP to log and close the connection on.
        if failure.check(amp.RemoteAmpError):
            return
        super().unhandledError(failure)

    def _bad_request(self, command: str, why: str) -> None:
        skipped = self._bad_requests.due()
        if skipped is None:
            return
        client = getattr(self.transport.getPeer(), "host", "?") if self.transport else "?"
        # "peer" is a neighbour's node id in every log event; a client is "client".
        self.log.warn(
            "bad client request {command} from {client}: {why}{more}",
            node=self.node.node_id,
            command=command,
            client=client,
            why=why,
            more=f" ({skipped} more bad requests not logged)" if skipped else "",
        )

    def _not_authenticated(self, box: amp.AmpBox) -> Deferred[Any]:
        what = "this" if self.limits.read_without_token else "any"
        return fail(
            amp.RemoteAmpError(
                b"NOT_AUTHENTICATED",
                f"node {self.node.node_id} refused: not authenticated ({what} command"
                " needs the client token: give --token-file, or token_file= in Python)",
            )
        )

    @Login.responder
    def login(self, token: bytes) -> dict[str, Any]:
        expected = self.node.client_token
        if expected is None or token_matches(expected, token):
            self.authenticated = True
            return {}
        # A wrong token ends the connection (after this answer): guesses cost a connection.
        self.node.clock.callLater(0, self._close_after_refusal)
        self._bad_request("Login", "wrong client token")
        raise NotAuthenticated(f"node {self.node.node_id} refused: not authenticated (wrong token)")

    def _close_after_refusal(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def _rate_limited(self) -> RateLimited:
        return RateLimited(
            f"node {self.node.node_id} refused: rate limit ({self.limits.submit_rate:g}"
            " submits per second per connection); retry later"
        )

    @Submit.responder
    def submit(self, body: str) -> Deferred[dict[str, Any]]:
        """Consecutive Submits of one read (a client that pipelines them) enter the node
        as one batch at the end of the read, or before the next other request; each is
        answered or refused on its own, as when it is submitted alone."""
        try:
            encoded = body.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageRejected("message is not valid Unicode text") from None
        if not self._submits.take(self.node.clock.seconds()):
            raise self._rate_limited()
        answer: Deferred[dict[str, Any]] = Deferred()
        self._read_submits.append((encoded, answer))
        if not self._in_read:
            self._submit_read()
        return answer

    def _submit_read(self) -> None:
        """The waiting Submits into the node as one ``submit_each``; each answered. While
        submits wait for a full link, each goes alone, so the bound on waiting bytes
        refuses the ones over it and not the whole read."""
        waiting, self._read_submits = self._read_submits, []
        if len(waiting) == 1 or not self.node.submits.is_open or self.node.submits.waiting:
            for body, answer in waiting:
                self._submit_one(body).chainDeferred(answer)
            return
        answers = [answer for _, answer in waiting]
        try:
            stored = self.node.submit_each([body for body, _ in waiting])
        except (StoreError, SubmitBusy) as e:
            for answer in answers:
                answer.errback(Failure(self._refusal(e)))
            return
        except Exception:
            for answer in answers:
                answer.errback(Failure())  # a bug: AMP reports it to each request
            return
        stored.addCallbacks(
            self._answer_submits,
            self._submits_failed,
            callbackArgs=(answers,),
            errbackArgs=(answers,),
        )

    def _submit_one(self, body: bytes) -> Deferred[dict[str, Any]]:
        try:
            stored = self.node.submit(body)
        except (SubmitRejected, StoreError, SubmitBusy) as e:
            return fail(self._refusal(e))
        except Exception:
            return fail()
        return stored.addCallbacks(_submitted, self._submit_failed)

    def _answer_submits(
        self, results: list[tuple[bytes, bool] | Exception], answers: list[Deferred[Any]]
    ) -> None:
        for result, answer in zip(results, answers, strict=True):
            if isinstance(result, tuple):
                answer.callback({"id": id_text(result[0]), "new": result[1]})
            else:
                answer.errback(Failure(self._refusal(result)))

    def _submits_failed(self, failure: Failure, answers: list[Deferred[Any]]) -> None:
        """Waiting Submits refused after all (busy node) or not made durable."""
        known = failure.check(SubmitRejected, StoreError, SubmitBusy) is not None
        for answer in answers:
            answer.errback(Failure(self._refusal(failure.value)) if known else failure)  # type: ignore[arg-type]

    @SubmitMany.responder
    def submit_many(self, bodies: list[str]) -> Deferred[dict[str, Any]]:
        # AMP bounds the list (one value: at most 65,535 bytes on the wire).
        encoded: list[bytes] = []
        unencodable: list[tuple[int, str]] = []
        now = self.node.clock.seconds()
        for i, body in enumerate(bodies):
            try:
                data = body.encode("utf-8")
            except UnicodeEncodeError:
                unencodable.append((i, "message is not valid Unicode text"))
                continue
            if not self._submits.take(now):
                unencodable.append((i, str(self._rate_limited())))
                continue
            encoded.append(data)
        try:
            stored = self.node.submit_many(encoded)
        except (StoreError, SubmitBusy) as e:
            raise self._refusal(e) from None

        def answer(results: list[tuple[bytes, bool] | str]) -> dict[str, Any]:
            for i, why in unencodable:
                results.insert(i, why)
            return _submitted_many(results)

        return stored.addCallbacks(answer, self._submit_failed)

    def _refusal(self, e: Exception) -> Exception:
        """The client's one-line error for a submit the node did not take."""
        if isinstance(e, SubmitBusy):
            return NodeBusy(f"node {self.node.node_id} is {e}")
        if isinstance(e, OriginRateLimited):
            return RateLimited(f"node {self.node.node_id} refused: {e}")
        if isinstance(e, StoreError):
            return MessageRejected(f"not stored: {e}")
        return MessageRejected(str(e))

    def _submit_failed(self, failure: Failure) -> Failure:
        """A submit that waited (busy node) or whose record could not be made durable."""
        failure.trap(SubmitRejected, StoreError, SubmitBusy)
        raise self._refusal(failure.value)  # type: ignore[arg-type]

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
        via, duplicates = self.node.core.arrivals.of(m.id)
        return {
            "id": id_text(m.id),
            "body": m.text,
            "received_at": m.received_at,
            "path": list(m.path),
            "via": via,
            "duplicates": duplicates,
        }

    @Arrivals.responder
    def arrivals(self, since: float, before: int) -> dict[str, Any]:
        messages, after = self.node.arrivals(since, before, ARRIVALS_PER_PAGE)
        rows = []
        for m in messages:
            via, duplicates = self.node.core.arrivals.of(m.id)
            rows.append(
                {
                    "id": id_text(m.id),
                    "received_at": m.received_at,
                    "path": list(m.path),
                    "via": via,
                    "duplicates": duplicates,
                    "size": len(m.body),
                }
            )
        return {"arrivals": rows, "next": after}

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
        # Pushes stop while the client's socket is full and go on from the cursor
        # when it drains (``write_full``): a slow watcher costs no memory here. A
        # watched connection is never idle.
        if not self._watching and len(self.node.following) >= self.limits.watchers:
            raise NodeBusy(
                f"node {self.node.node_id} is busy: {len(self.node.following)} connections"
                " follow it (Watch), the limit; retry later"
            )
        self.node.following.add(self)
        self._watch_at = max(0, start)
        self._watching = True
        self._idle_check()
        self.node.clock.callLater(0, self._start_pushing)  # after this answer
        return {"durable": self.node.store.durable_count()}

    def _start_pushing(self) -> None:
        if self._watching and not self._write_full and self.transport is not None:
            self.node.watcher_ready(self)

    def push_delivered(self) -> None:
        """Send ``Delivered`` for every durable id past the cursor (until the socket is full)."""
        if not self._watching or self._write_full or self.transport is None:
            return
        store = self.node.store
        durable = store.durable_count()
        while self._watch_at < durable and not self._write_full:
            ids = store.ids_from(self._watch_at, min(IDS_PER_PAGE, durable - self._watch_at))
            self.callRemote(Delivered, start=self._watch_at, ids=b"".join(ids))
            self._watch_at += len(ids)

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


def _argument_error(e: Exception) -> str:
    if isinstance(e, KeyError):
        key = e.args[0] if e.args else b"?"
        name = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        return f"missing argument {shown(repr(name), 40)}"
    return f"malformed argument ({shown(f'{type(e).__name__}: {e}', 160)})"


class ClientFactory(ServerFactory):
    """The client port: a connection over the total or its source's limit is closed at
    once (one log line per ``log_interval`` says so and how many)."""

    noisy = False
    log = logs.logger()

    def __init__(self, node: GossipNode, limits: ClientLimits | None = None) -> None:
        self.node = node
        limits = limits or ClientLimits.from_config(node.config)
        self.limits = limits
        self.open = 0
        self.per_source: dict[str, int] = {}
        node.client_ports.append(self)
        self._refusals = LogThrottle(node.clock, limits.log_interval)
        self._bad_requests = LogThrottle(node.clock, limits.log_interval)

    def buildProtocol(self, addr: IAddress) -> ClientProtocol | None:  # type: ignore[override]
        source = str(getattr(addr, "host", "?"))
        held = self.per_source.get(source, 0)
        if self.open >= self.limits.connections:
            self._refused(source, f"{self.open} client connections open, the limit")
            return None
        if held >= self.limits.per_source:
            self._refused(source, f"{held} connections from it open, the per-source limit")
            return None
        self.open += 1
        self.per_source[source] = held + 1
        return ClientProtocol(
            self.node, self.limits, lambda: self._closed(source), self._bad_requests
        )

    def _closed(self, source: str) -> None:
        self.open -= 1
        left = self.per_source[source] - 1
        if left:
            self.per_source[source] = left
        else:
            del self.per_source[source]

    def _refused(self, source: str, why: str) -> None:
        skipped = self._refusals.due()
        if skipped is None:
            return
        self.log.warn(
            "refusing a client connection from {source}: {why}{more}",
            node=self.node.node_id,
            source=source,
            why=why,
            more=f" ({skipped} more refused since the last report)" if skipped else "",
        )
