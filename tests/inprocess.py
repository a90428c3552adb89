"""Several real ``GossipNode``s in one process: the middle layer of tests.

Between the pure core's tests (``test_core``, ``test_plumtree``: effects
recorded) and the real-process tests (``test_cluster``: sockets, twistd), this
runs whole nodes (link table, framing, codec, core, stores, re-sync streams,
watchers) with no sockets and no real time. Every node's dials go through its
own ``NodeReactor``, a thin view of ONE shared ``MemoryReactorClock``: the
clock is common, and each dial is tagged with who made it, so ``Cluster`` can
route it to the node it names over ``twisted.test.iosim``. Each node ticks
from a ``LoopingCall`` on the shared clock, as ``gossip.tap``'s ``TimerService``
does. Deterministic: time moves only in ``run``, in fixed steps.

What a test can do to the network:
- ``cut(a, b)`` / ``heal(a, b)``: a partition of one link; bytes on its
  connections are lost and new dials between the two hang until they time out;
- ``kill(n)``: the process dies: its connections drop on both ends at once
  (as the kernel resets them), dials to it are refused, it does nothing more;
- ``stop(n)``: a graceful stop (``stopService``: what it says as it stops goes
  out before its connections close);
- ``pause(n)`` / ``resume(n)``: the process does not run for a while (a loaded
  machine): it reads, writes and ticks nothing; bytes for it wait. On resume its
  late tick runs first, then it reads what waited (timers before I/O, as a reactor);
- ``add(n, config)``: a node with a cluster file of its own (one joining a
  running cluster whose other nodes' file does not name it);
- ``restart(n)``: a new ``GossipNode`` for ``n`` (new incarnation) on the
  same store (a ``MemoryStore`` kept as it was, or a ``LogStore`` reopened from
  its directory).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.base import BaseConnector
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from gossip.config import ClusterConfig
from gossip.node import TICK_SECONDS, GossipNode
from gossip.store.interface import MessageStore
from gossip.store.log import LogStore
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config

STEP = 0.005  # simulated seconds per round of ``Cluster.run``
SETTLE_ROUNDS = 1000  # pump rounds per step before the network counts as not settling


class _DialTransport:
    """The part of a TCP client transport a connector talks to before connecting."""

    def __init__(self, connector: _Connector) -> None:
        self.connector = connector
        self.done = False

    def failIfNotConnected(self, err: Exception) -> None:
        if not self.done:
            self.done = True
            self.connector.connectionFailed(Failure(err))


class _Connector(BaseConnector):
    """Twisted's real connector state machine over a dial that ``Cluster`` completes."""

    def __init__(
        self, reactor: NodeReactor, host: str, port: int, factory: Any, timeout: float
    ) -> None:
        super().__init__(factory, timeout, reactor)  # type: ignore[arg-type]
        self.node_reactor = reactor
        self.host = host
        self.port = port

    def _makeTransport(self) -> Any:
        self.node_reactor.dials.append(self)
        return _DialTransport(self)

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)


class _DialedTransport(iosim.FakeTransport):
    """The dialing end of an in-memory connection: tells its connector when it ends."""

    def __init__(self, protocol: Any, connector: _Connector) -> None:
        super().__init__(protocol, isServer=False, peerAddress=connector.getDestination())
        self.connector = connector

    def reportDisconnect(self) -> None:
        super().reportDisconnect()
        self.connector.connectionLost(Failure(self.disconnectReason))


class NodeReactor:
    """One node's view of the shared clock: time and calls are the shared reactor's;
    ``connectTCP`` records the dial (with its node) for ``Cluster`` to route."""

    def __init__(self, shared: MemoryReactorClock, node_id: int) -> None:
        self.shared = shared
        self.node_id = node_id
        self.dials: list[_Connector] = []

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> _Connector:
        connector = _Connector(self, host, port, factory, timeout)
        connector.connect()
        return connector

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shared, name)


@attrs.define
class _Connection:
    dialer: int
    peer: int
    pump: iosim.IOPump


class Cluster:
    """``n`` GossipNodes (config from ``generate_config``; ``settings`` override its
    fields, e.g. ``dissemination="flood"``) on one shared clock. ``data_dir`` gives
    each node a ``LogStore`` in ``data_dir/node-N`` (fsync "never": no thread pool
    under a fake clock); without it, a ``MemoryStore``. Nodes start when ``start``
    says so (all by default)."""

    def __init__(
        self,
        n: int = 16,
        *,
        data_dir: Path | None = None,
        start: Iterable[int] | None = None,
        **settings: Any,
    ) -> None:
        self.config: ClusterConfig = attrs.evolve(generate_config(n, name="inprocess"), **settings)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000.0)
        self.data_dir = data_dir
        self.ports = {
            int(spec.peer_address.split("port=")[1].split(":")[0]): node_id
            for node_id, spec in self.config.nodes.items()
        }
        self.stores: dict[int, MessageStore] = {}
        # Nodes started with a cluster file of their own (see ``add``).
        self.node_configs: dict[int, ClusterConfig] = {}
        self.nodes: dict[int, GossipNode] = {}
        self.alive: set[int] = set()
        self.cut_pairs: set[frozenset[int]] = set()
        self.paused: set[int] = set()
        self.connections: list[_Connection] = []
        self._tickers: dict[int, LoopingCall] = {}
        self._incarnations = itertools.count(1)
        for node_id in self.config.nodes:
            self.nodes[node_id] = self._make(node_id)
        for node_id in self.config.nodes if start is None else start:
            self.start(node_id)

    # -- nodes -----------------------------------------------------------------

    def _store(self, node_id: int) -> MessageStore:
        if self.data_dir is None:
            store = self.stores.get(node_id)
            return store if store is not None else MemoryStore()
        return LogStore.open(self.data_dir / f"node-{node_id}", fsync="never", reactor=self.reactor)

    def _make(self, node_id: int) -> GossipNode:
        store = self.stores[node_id] = self._store(node_id)
        return GossipNode(
            self.node_configs.get(node_id, self.config),
            node_id,
            store,
            NodeReactor(self.reactor, node_id),
            incarnation=next(self._incarnations),
        )

    def start(self, node_id: int) -> None:
        """Start ``node_id``: it listens, dials its neighbours and ticks."""
        node = self.nodes[node_id]
        self.alive.add(node_id)
        node.startService()
        ticker = self._tickers[node_id] = LoopingCall(node.tick)
        ticker.clock = self.reactor
        ticker.start(TICK_SECONDS, now=False)

    def kill(self, node_id: int) -> None:
        """``node_id``'s process dies: its connections drop at once on both ends."""
        self.alive.discard(node_id)
        self._tickers.pop(node_id).stop()
        for c in self.connections:
            if node_id in (c.dialer, c.peer):
                c.pump.clientIO.abortConnection()
        self._settle()
        self.nodes[node_id].stopService()  # stops its dialing; closes its store

    def stop(self, node_id: int) -> Any:
        """``node_id`` stops gracefully: ``stopService``, then its connections close.
        Returns what ``stopService`` returned (a Deferred when the stop waits)."""
        self._tickers.pop(node_id).stop()
        result = self.nodes[node_id].stopService()
        self._settle()
        self.alive.discard(node_id)
        return result

    def add(self, node_id: int, config: ClusterConfig) -> GossipNode:
        """Start a new node ``node_id`` with its own cluster file ``config``."""
        self.node_configs[node_id] = config
        address = config.node(node_id).peer_address
        self.ports[int(address.split("port=")[1].split(":")[0])] = node_id
        self.nodes[node_id] = self._make(node_id)
        self.start(node_id)
        return self.nodes[node_id]

    def restart(self, node_id: int) -> GossipNode:
        """A new process for ``node_id`` on the same store (new incarnation)."""
        if node_id in self.alive:
            self.kill(node_id)
        self.nodes[node_id] = self._make(node_id)
        self.start(node_id)
        return self.nodes[node_id]

    # -- network ---------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        """Partition the link a-b: live connections deliver nothing more (each end
        learns only of its own timeouts), new dials between them hang."""
        pair = frozenset((a, b))
        self.cut_pairs.add(pair)
        for c in self.connections:
            if frozenset((c.dialer, c.peer)) == pair:
                c.pump.clientIO.getOutBuffer()  # in flight: lost
                c.pump.serverIO.getOutBuffer()

    def heal(self, a: int, b: int) -> None:
        self.cut_pairs.discard(frozenset((a, b)))

    def pause(self, node_id: int) -> None:
        """``node_id``'s process stops running (descheduled): no reads, writes or ticks."""
        self.paused.add(node_id)
        self._tickers.pop(node_id).stop()

    def resume(self, node_id: int) -> None:
        """``node_id`` runs again: its overdue tick first, then the reads that waited."""
        self.paused.discard(node_id)
        node = self.nodes[node_id]
        node.tick()
        ticker = self._tickers[node_id] = LoopingCall(node.tick)
        ticker.clock = self.reactor
        ticker.start(TICK_SECONDS, now=False)
        self._settle()

    def run(self, seconds: float, step: float = STEP) -> None:
        """Move the shared clock ``seconds`` on, in ``step``s, settling the network
        (dials answered, bytes delivered, closes reported) after each."""
        end = self.reactor.seconds() + seconds
        self._settle()
        while self.reactor.seconds() < end - 1e-9:
            self.reactor.advance(min(step, end - self.reactor.seconds()))
            self._settle()

    def _settle(self) -> None:
        for _ in range(SETTLE_ROUNDS):
            moved = self._answer_dials()
            for c in self.connections:
                if frozenset((c.dialer, c.peer)) in self.cut_pairs:
                    c.pump.clientIO.getOutBuffer()
                    c.pump.serverIO.getOutBuffer()
                    moved = self._report_own_close(c) or moved
                    continue
                if c.dialer in self.paused or c.peer in self.paused:
                    continue  # a paused process neither reads nor writes
                moved = c.pump.pump(advanceClock=False) or moved
            self.reactor.advance(0)
            self.connections = [
                c
                for c in self.connections
                if not (c.pump.clientIO.disconnected and c.pump.serverIO.disconnected)
            ]
            if not moved:
                return
        raise AssertionError("the in-process network did not settle")

    @staticmethod
    def _report_own_close(c: _Connection) -> bool:
        """Across a cut, a close reaches only the end that made it."""
        moved = False
        for io in (c.pump.clientIO, c.pump.serverIO):
            if io.disconnecting and not io.disconnected:
                io.disconnected = True
                io.reportDisconnect()
                moved = True
        return moved

    def _answer_dials(self) -> bool:
        moved = False
        for dialer, node in self.nodes.items():
            reactor = node.reactor
            assert isinstance(reactor, NodeReactor)
            pending, reactor.dials = reactor.dials, []
            for connector in pending:
                transport = connector.transport
                if connector.state != "connecting" or transport.done:
                    continue
                peer = self.ports.get(connector.port)
                if dialer not in self.alive:
                    continue  # a dead process's last dial goes nowhere
                if peer is None or frozenset((dialer, peer)) in self.cut_pairs:
                    reactor.dials.append(connector)  # hangs until the dial times out
                    continue
                moved = True
                if peer not in self.alive:
                    transport.failIfNotConnected(error.ConnectionRefusedError())
                    continue
                transport.done = True
                client = connector.buildProtocol(connector.getDestination())
                source = IPv4Address("TCP", "127.0.0.1", 40000 + dialer)
                server = self.nodes[peer].links.server_factory().buildProtocol(source)
                if server is None:
                    continue  # refused by the listener (handshake slots)
                pump = iosim.connect(
                    server,
                    iosim.FakeTransport(server, isServer=True, peerAddress=source),
                    client,
                    _DialedTransport(client, connector),
                    greet=False,
                    clock=self.reactor,
                )
                self.connections.append(_Connection(dialer, peer, pump))
        return moved

    # -- observations ----------------------------------------------------------

    def neighbours(self, node_id: int) -> tuple[int, ...]:
        config = self.node_configs.get(node_id, self.config)
        return tuple(config.nodes[node_id].neighbours)

    def links_up(self, nodes: Iterable[int] | None = None) -> bool:
        """Whether every link between live nodes (of ``nodes``) is up on both ends."""
        chosen = self.alive if nodes is None else set(nodes) & self.alive
        return all(
            self.nodes[a].links.is_up(b)
            for a in chosen
            for b in self.neighbours(a)
            if b in self.alive
        )

    def run_until_links_up(self, deadline: float = 10.0) -> float:
        """Run until every link between live nodes is up; returns how long it took."""
        start = self.reactor.seconds()
        while not self.links_up():
            if self.reactor.seconds() - start > deadline:
                raise AssertionError(f"links not all up within {deadline} s")
            self.run(0.05)
        return self.reactor.seconds() - start

    def holders(self, mid: bytes) -> set[int]:
        return {n for n in self.alive if mid in self.nodes[n].store}

    def submit(self, node_id: int, body: bytes) -> bytes:
        """Submit ``body`` at ``node_id`` and return its id once stored there."""
        result: list[tuple[bytes, bool]] = []
        self.nodes[node_id].submit(body).addCallback(result.append)
        self.run(0)
        assert result, f"submit at node {node_id} did not complete"
        return result[0][0]

    def run_until_everywhere(self, mids: Iterable[bytes], deadline: float = 5.0) -> float:
        """Run until every live node holds every id; returns how long it took."""
        wanted = list(mids)
        start = self.reactor.seconds()
        while not all(len(self.holders(m)) == len(self.alive) for m in wanted):
            if self.reactor.seconds() - start > deadline:
                missing = {m.hex()[:8]: sorted(self.alive - self.holders(m)) for m in wanted}
                raise AssertionError(f"not everywhere within {deadline} s: {missing}")
            self.run(STEP)
        return self.reactor.seconds() - start

    def sent(self, kind: str) -> tuple[int, int]:
        """(frames, messages) of ``kind`` sent by all nodes so far (``gossip.traffic``)."""
        frames = messages = 0
        for node in self.nodes.values():
            counts = node.traffic.kinds.get(kind)
            if counts is not None:
                frames += counts.frames_out
                messages += counts.messages_out
        return frames, messages
