"""The whole cluster as one node sees it, for the dashboard.

Any node can serve the dashboard: it asks every node of the cluster file for its
``Status`` over AMP (its own node directly, without a connection), once a
second while someone is watching, and keeps the last answers. A node that
cannot be reached is shown as down, with the reason. The propagation of a
message ("trace") is gathered with ``Get`` on every node: when it arrived there
and through which path; a node that has it is not asked again (a stored
record never changes).

Bounds: at most ``MAX_CONCURRENT_QUERIES`` AMP calls in flight, one poll per
node at a time (a slow node is skipped, not queued), each call given up after
``QUERY_TIMEOUT`` seconds, at most ``MAX_TRACES`` messages followed at once
(least recently asked for dropped first), and polling stops
``IDLE_STOP_SECONDS`` after the last viewer asked for anything.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, TimeoutError
from twisted.internet.task import LoopingCall

from gossip import logs
from gossip.client.api import GossipClient, StoredMessage
from gossip.client.commands import AmbiguousId, BadId, MessageRejected, NodeBusy, NotFound
from gossip.config import ClusterConfig
from gossip.core.message import BadIdText, id_range, id_text
from gossip.core.state import SubmitRejected
from gossip.log_guard import shorten
from gossip.store.interface import StoreError
from gossip.submit_gate import SubmitBusy

POLL_SECONDS = 1.0
MAX_CONCURRENT_QUERIES = 8
QUERY_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0
MAX_TRACES = 16
IDLE_STOP_SECONDS = 30.0
RATE_WINDOW = 5  # polls over which a node's message rate is measured

UP, DOWN, CONNECTING, UNKNOWN = "up", "down", "connecting", "unknown"


class NodeClient(Protocol):
    """What the view needs of a node: ``GossipClient``'s calls (or ``LocalClient``'s)."""

    def status(self) -> Awaitable[dict[str, Any]]: ...

    def get_message(self, msg_id: str) -> Awaitable[StoredMessage]: ...

    def submit_message(self, message: str) -> Awaitable[str]: ...

    def close(self) -> None: ...


class LocalClient:
    """The serving node itself, called directly: no connection to its own client port."""

    def __init__(self, node: Any) -> None:
        self.node = node

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.node.status()
        return result

    async def get_message(self, msg_id: str) -> StoredMessage:
        try:
            matches = self.node.find(msg_id.strip(), limit=2)
        except BadIdText as e:
            raise BadId(str(e)) from None
        if not matches:
            raise NotFound(f"no message {msg_id} on node {self.node.node_id}")
        if len(matches) > 1:
            raise AmbiguousId(f"{msg_id} matches several messages")
        m = matches[0]
        return StoredMessage(id_text(m.id), m.text, m.received_at, tuple(m.path))

    async def submit_message(self, message: str) -> str:
        """As the client port's ``Submit`` does: the node's refusals as the client's errors."""
        try:
            mid, _ = await self.node.submit(message.encode("utf-8"))
        except UnicodeEncodeError:
            raise MessageRejected("message is not valid Unicode text") from None
        except SubmitBusy as e:
            raise NodeBusy(f"node {self.node.node_id} is {e}") from None
        except StoreError as e:
            raise MessageRejected(f"not stored: {e}") from None
        except SubmitRejected as e:
            raise MessageRejected(str(e)) from None
        return id_text(mid)

    def close(self) -> None:
        pass


Connect = Callable[[int], Awaitable[NodeClient]]


@attrs.define
class NodeView:
    """The last known state of one node."""

    id: int
    up: bool | None = None  # None: not asked yet
    error: str = ""
    message_count: int | None = None
    rate: float | None = None  # messages per second over the last RATE_WINDOW polls
    links: dict[int, str] = attrs.Factory(dict)  # peer -> state, as this node reports it
    history: deque[tuple[float, int]] = attrs.Factory(lambda: deque(maxlen=RATE_WINDOW + 1))

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": UNKNOWN if self.up is None else (UP if self.up else DOWN),
            "error": self.error,
            "message_count": self.message_count,
            "rate": self.rate,
        }


@attrs.define
class Trace:
    """Where one message has arrived: node -> (received_at, path)."""

    query: str  # the id or prefix asked for
    id: str = ""  # the full id, once a node has it
    body: str = ""
    error: str = ""  # an ambiguous prefix
    arrivals: dict[int, StoredMessage] = attrs.Factory(dict)

    def as_json(self, nodes: dict[int, NodeView]) -> dict[str, Any]:
        first = min((m.received_at for m in self.arrivals.values()), default=None)
        return {
            "query": self.query,
            "id": self.id,
            "body": self.body,
            "error": self.error,
            "reached": len(self.arrivals),
            "total": len(nodes),
            # Down nodes we have no record from: whether they hold it is not known.
            "unknown": sorted(n for n, v in nodes.items() if not v.up and n not in self.arrivals),
            "first_at": first,
            "nodes": {
                str(n): {"received_at": m.received_at, "path": list(m.path)}
                for n, m in sorted(self.arrivals.items())
            },
        }


class ClusterView:
    """Polls every node of ``config`` while watched; ``listeners`` hear each new picture."""

    log = logs.logger()

    def __init__(
        self,
        config: ClusterConfig,
        local_id: int | None,
        local: NodeClient | None,
        clock: Any,
        connect: Connect | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.local_id = local_id
        self._local = local
        self._connect = connect or self._connect_amp
        self.nodes = {n: NodeView(n) for n in sorted(config.nodes)}
        self.traces: OrderedDict[str, Trace] = OrderedDict()
        self.listeners: list[Callable[[], None]] = []
        self._clients: dict[int, NodeClient] = {}
        self._in_flight: set[int] = set()
        self._limit = DeferredSemaphore(MAX_CONCURRENT_QUERIES)
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        self._wanted_at: float | None = None
        self.rounds = 0

    # -- viewers -------------------------------------------------------------

    def want(self) -> None:
        """Someone is looking: poll (now, if polling had stopped) for a while longer."""
        self._wanted_at = self.clock.seconds()
        if not self._loop.running:
            self._loop.start(POLL_SECONDS, now=True)

    def follow(self, query: str) -> Trace:
        """Follow a message's propagation (``query``: its id or a unique prefix).
        Raises ``BadIdText`` for text that cannot be an id."""
        query = query.strip()
        id_range(query)  # raises BadIdText
        trace = self.traces.get(query)
        if trace is None:
            trace = self.traces[query] = Trace(query)
            while len(self.traces) > MAX_TRACES:
                self.traces.popitem(last=False)
        self.traces.move_to_end(query)
        self.want()
        return trace

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    # -- the picture -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "cluster": self.config.name,
            "served_by": self.local_id,
            "time": self.clock.seconds(),
            "nodes": [v.as_json() for v in self.nodes.values()],
            "links": [
                {"a": a, "b": b, "state": self.link_state(a, b)} for a, b in self.config.edges()
            ],
        }

    def link_state(self, a: int, b: int) -> str:
        """A link is down when either end is down or says so, up when every end
        that answered says up; "unknown" before any answer."""
        ends = (self.nodes[a], self.nodes[b])
        if any(v.up is False for v in ends):
            return DOWN
        reports = [r for r in (ends[0].links.get(b), ends[1].links.get(a)) if r is not None]
        if not reports:
            return UNKNOWN
        if DOWN in reports:
            return DOWN
        return UP if all(r == UP for r in reports) else CONNECTING

    def trace_json(self, query: str) -> dict[str, Any] | None:
        trace = self.traces.get(query.strip())
        return None if trace is None else trace.as_json(self.nodes)

    # -- polling ---------------------------------------------------------------

    def poll(self) -> Deferred[None]:
        """One round: every node not still answering the last round is asked again;
        listeners hear the result once every call of the round has ended."""
        now = self.clock.seconds()
        if self._wanted_at is not None and now - self._wanted_at > IDLE_STOP_SECONDS:
            self.stop()
            return Deferred.fromCoroutine(_nothing())
        calls = []
        for n in self.nodes:
            if n in self._in_flight:
                continue
            self._in_flight.add(n)
            calls.append(Deferred.fromCoroutine(self._poll_node(n)))
        done: Deferred[Any] = DeferredList(calls, consumeErrors=True)
        return done.addCallback(lambda _: self._published())

    def _published(self) -> None:
        self.rounds += 1
        for listener in list(self.listeners):
            listener()

    async def _poll_node(self, n: int) -> None:
        view = self.nodes[n]
        try:
            client = await self._client(n)
            status = await self._call(client.status)
            now = self.clock.seconds()
            view.up, view.error = True, ""
            view.message_count = int(status["message_count"])
            view.links = {int(link["peer"]): str(link["state"]) for link in status["links"]}
            view.history.append((now, view.message_count))
            (t0, c0), (t1, c1) = view.history[0], view.history[-1]
            view.rate = (c1 - c0) / (t1 - t0) if t1 > t0 else None
            for trace in list(self.traces.values()):
                if n not in trace.arrivals and not trace.error:
                    await self._trace_on(client, n, trace)
        except Exception as e:
            self._drop_client(n)
            view.up, view.error = False, _why(e)
            view.links = {}
            view.history.clear()
            view.rate = None
        finally:
            self._in_flight.discard(n)

    async def _trace_on(self, client: NodeClient, n: int, trace: Trace) -> None:
        try:
            m = await self._call(lambda: client.get_message(trace.id or trace.query))
        except NotFound:
            return
        except (AmbiguousId, BadId) as e:
            trace.error = str(e)
            return
        trace.id, trace.body = m.id, m.body
        trace.arrivals[n] = m

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        async def limited() -> Any:
            return await call()

        d = self._limit.run(lambda: Deferred.fromCoroutine(limited()))
        return await d.addTimeout(QUERY_TIMEOUT, self.clock)

    async def _client(self, n: int) -> NodeClient:
        if n == self.local_id and self._local is not None:
            return self._local
        client = self._clients.get(n)
        if client is None:
            client = await self._connect(n)
            self._clients[n] = client
        return client

    def _drop_client(self, n: int) -> None:
        client = self._clients.pop(n, None)
        if client is not None:
            client.close()

    async def _connect_amp(self, n: int) -> NodeClient:
        return await GossipClient.connect_node(self.clock, n, self.config, CONNECT_TIMEOUT)

    async def submit(self, node: int, body: str) -> str:
        """Submit ``body`` to ``node``; its id (the client API's errors otherwise)."""
        client = await self._client(node)
        try:
            result: str = await self._call(lambda: client.submit_message(body))
        except (ConnectionError, TimeoutError):
            self._drop_client(node)
            raise
        return result


async def _nothing() -> None:
    return None


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {QUERY_TIMEOUT:g} s"
    return shorten(str(e) or type(e).__name__)
