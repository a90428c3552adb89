"""One gossip node: the core wired to storage, peer links and the client port's commands.

This is the only place where the core's effects meet I/O. Effects of one
event are carried out in order before the next event reaches the core:
``Persist`` goes to the store, ``Send`` to the link table, ``DropPeer``
closes a link. Listening and the clock's ticks are services beside this one,
composed in ``gossip.tap.node_services``.

Persist before send, as raft does: payloads wait in a per-peer outbox and go
out in ``flush`` right after the store has written what it buffered, so a
message reaches a neighbour only once it is in this node's file (and, with
fsync "always", durable). ``flush`` runs once per reactor turn, after all the
reads of its I/O pass (a ``callLater(0)``): under load one poll hands the node
reads from several neighbours and clients, and their payloads leave as one
frame per neighbour after one write to the store, not one of each per read.
Sending them per read would not reach the wire sooner: a transport writes in
the reactor's next I/O pass either way.

A store failure takes one path (``_store_failed``): the outbox is dropped,
every pending and later submit is refused with the store's one-line reason,
and the node's owner is told through ``on_fatal`` (``gossip.tap`` stops the
process with exit status 1).
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure

from gossip import logs, settings
from gossip.client.tokens import TokenError, read_token
from gossip.config import ClusterConfig
from gossip.core.dissemination import Dissemination, Flood
from gossip.core.effects import (
    Dial,
    DropPeer,
    Effect,
    Hangup,
    Persist,
    PersistBatch,
    Send,
    StreamMessages,
)
from gossip.core.frames import GossipFrame, PeerFrame
from gossip.core.message import Message, id_range
from gossip.core.overlay import Overlay
from gossip.core.plumtree import Plumtree
from gossip.core.state import GossipCore, SubmitRejected
from gossip.core.sync import stream_frames
from gossip.net.links import LinkEvents, LinkTable
from gossip.net.peer_protocol import NOT_READING
from gossip.net.tls import PeerTLS, TLSSetupError, load_peer_tls
from gossip.store.interface import MessageStore, StoreError
from gossip.submit_gate import SubmitBusy, SubmitGate
from gossip.sync_streams import SyncStreams
from gossip.traffic import Traffic
from gossip.wire import codec

Graph = dict[int, tuple[int, ...]]
STRATEGIES: dict[str, Callable[[int, Graph], Dissemination]] = {
    "flood": lambda node_id, _graph: Flood(node_id),
    "plumtree": Plumtree,
}

TICK_SECONDS = 0.1
# Payload bytes per batched Gossip frame (well under the receiver's frame limit).
GOSSIP_FRAME_BYTES = 256 * 1024
# A neighbour's link that stays full this long without draining once is dropped; the
# neighbour catches up by re-sync when it is back. A link that drains even slowly is kept.
LINK_STALL_SECONDS = 30.0
# A node whose TLS certificate expires sooner than this warns at start.
CERT_EXPIRY_WARNING = datetime.timedelta(days=30)
# Body bytes of submits that may wait while a neighbour's link is full; beyond it a
# submit is refused at once as "busy" (retryable). The setting max_waiting_submit_bytes.
MAX_WAITING_SUBMIT_BYTES = settings.MAX_WAITING_SUBMIT_BYTES.default
# What became of a client's submit: a new message stored, one already held, refused
# (size, encoding), refused as busy (retryable), or not stored (the store failed).
SUBMIT_OUTCOMES = ("stored", "duplicate", "rejected", "busy", "failed")


def _refusal_texts(
    results: list[tuple[bytes, bool] | Exception],
) -> list[tuple[bytes, bool] | str]:
    """``submit_each``'s results with each refusal as the client's one-line reason."""
    return [
        r if isinstance(r, tuple) else f"not stored: {r}" if isinstance(r, StoreError) else str(r)
        for r in results
    ]


def frame_limit(max_body: int) -> int:
    """Largest peer frame accepted: a full batch of maximum-size messages fits."""
    return max(1 << 20, 8 * max_body + 65536)


class StartupError(Exception):
    """The node cannot start (port in use, ...); the text is one line for the operator."""


class GossipNode(service.Service):
    log = logs.logger()

    def __init__(
        self,
        config: ClusterConfig,
        node_id: int,
        store: MessageStore,
        reactor: Any,
        *,
        incarnation: int | None = None,
        send_delay: float = 0.0,
        on_fatal: Callable[[str], object] | None = None,
    ) -> None:
        """``on_fatal`` is called once, with the reason, when the node cannot go on (its
        store failed); the caller decides how to stop (never the node itself)."""
        self.config = config
        self.spec = config.node(node_id)
        self.node_id = node_id
        self.store = store
        self.reactor: IReactorTCP = reactor
        self.clock: IReactorTime = reactor
        if incarnation is None:
            incarnation = random.getrandbits(63) + 1
        strategy = STRATEGIES[config.dissemination](
            node_id, {n: spec.neighbours for n, spec in config.nodes.items()}
        )
        overlay = None
        if config.overlay == "dynamic":
            overlay = Overlay(
                node_id,
                self.spec.peer_address,
                incarnation,
                {n: config.nodes[n].peer_address for n in self.spec.neighbours},
                strategy,
                replace_after=config.replace_after,
                max_degree=config.overlay_max_degree,
            )
        self.core = GossipCore(
            node_id,
            self.spec.neighbours,
            store,
            strategy,
            config.max_message_bytes,
            config.nodes,
            sync_interval=config.sync_interval,
            sync_timeout=config.sync_timeout,
            origin_rate=config.origin_rate,
            origin_burst=config.origin_burst,
        )
        if overlay is not None:
            self.core.use_overlay(overlay)
        # One PersistBatch and one Send per neighbour and frame: the store and the
        # links take a frame's messages at once.
        self.core.effects_per_frame = True
        self.peer_tls = self._load_tls(config, node_id)
        # The token clients must Login with (None: the client port needs none).
        self.client_token = self._load_client_token(config, node_id)
        self.links = LinkTable(
            node_id=node_id,
            cluster=config.name,
            neighbours={n: config.nodes[n].peer_address for n in self.spec.neighbours},
            reactor=reactor,
            clock=reactor,
            events=LinkEvents(self._peer_up, self._peer_down, self._frame, self._congestion),
            max_frame=frame_limit(config.max_message_bytes),
            reconnect_max_delay=config.reconnect_max_delay,
            ping_interval=config.ping_interval,
            idle_timeout=config.idle_timeout,
            hello_timeout=config.peer_hello_timeout,
            max_pending_bytes=config.peer_max_queued_bytes,
            max_unidentified=config.peer_max_handshakes,
            max_handshakes_per_source=config.peer_max_handshakes_per_source,
            incarnation=incarnation,
            send_delay=send_delay,
            tls=self.peer_tls,
            accept_peer=overlay.accepts if overlay is not None else None,
            # A seed list shared by every node names this one too: not dialed.
            seeds=[s for s in config.join if s != self.spec.peer_address] if overlay else (),
        )
        self.traffic = Traffic()
        # Per peer: encoded ``Gossip.messages`` entries to send at the next flush.
        self._outbox: dict[int, list[bytes]] = {}
        # Backpressure: while any neighbour's link is full, new submits wait (bounded)
        # so they add nothing to what cannot be sent; reads and relaying go on.
        # Per full link: since when it has not drained (a stalled one is dropped).
        self._congested: dict[int, float] = {}
        # Client submits by outcome (Prometheus: gossip_submits_total{outcome}).
        self.submit_outcomes: dict[str, int] = dict.fromkeys(SUBMIT_OUTCOMES, 0)
        self.submits = SubmitGate(
            config.max_waiting_submit_bytes, lambda f: self.clock.callLater(0, f)
        )
        # Client connections following deliveries (Watch) that can take more pushes
        # now: one whose socket is full leaves this set until it drains.
        self.watchers: set[Any] = set()
        # Every client connection that follows deliveries (bounded: client_max_watchers).
        self.following: set[Any] = set()
        # The client ports' factories (each counts its open connections, for metrics).
        self.client_ports: list[Any] = []
        self._watchers_told = 0  # durable count every watcher in the set was pushed up to
        self._durability_wait = False
        self.failed: str | None = None  # why the store failed: every submit is refused
        self.on_fatal = on_fatal
        store.when_broken().addCallback(self._store_failed)
        self._flush_call: IDelayedCall | None = None
        self._cooperator = Cooperator(scheduler=lambda f: self.clock.callLater(0, f))
        # Answers to neighbours' SyncWants: one at a time per neighbour, the rest queued.
        self.sync_streams = SyncStreams(
            lambda order: stream_frames(self.store, self.node_id, order, self.core.members),
            self.links,
            self.traffic,
            self._cooperator,
        )
        self.started_at = 0.0

    @staticmethod
    def _load_tls(config: ClusterConfig, node_id: int) -> PeerTLS | None:
        if not config.tls:
            return None
        try:
            return load_peer_tls(config.tls_files(node_id), node_id)
        except TLSSetupError as e:
            raise StartupError(f"cluster.tls: {e}") from None

    @staticmethod
    def _load_client_token(config: ClusterConfig, node_id: int) -> bytes | None:
        path = config.client_token_path(node_id)
        if path is None:
            return None
        try:
            return read_token(path)
        except TokenError as e:
            raise StartupError(f"client_token_file: {e}") from None

    # -- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        """Start dialing neighbours. The ports already listen (``node_services`` listens
        before this runs) and ``tick`` is called by a ``TimerService`` beside it."""
        self.started_at = self.clock.seconds()
        spec = self.spec
        super().startService()
        self._apply(self.core.start(self.started_at))
        self.links.start()
        self.log.info(
            "node {node} of cluster {cluster} up: peers on {peer_listen},"
            " clients on {client_listen}, {count} messages held",
            node=self.node_id,
            cluster=self.config.name,
            peer_listen=spec.peer_listen,
            client_listen=spec.client_listen,
            count=len(self.store),
        )
        self._log_peer_security()
        if self.client_token is None:
            self.log.info(
                "clients need no token (no client_token_file): anyone who can reach"
                " {client_listen} can submit",
                client_listen=spec.client_listen,
            )
        else:
            self.log.info(
                "clients must log in with the client token to submit{reads}",
                reads=" (reading needs none)"
                if self.config.client_read_without_token
                else " or read",
            )

    def _log_peer_security(self) -> None:
        """One line on how peer links are protected; a warning when they are not."""
        tls = self.peer_tls
        if tls is None:
            self.log.warn(
                "peer links are not encrypted or authenticated (cluster.tls = false):"
                " anyone who can reach {peer_listen} can join as a neighbour",
                peer_listen=self.spec.peer_listen,
            )
            return
        expires = tls.certificate.not_valid_after_utc
        left = expires - datetime.datetime.now(datetime.UTC)
        emit = self.log.warn if left < CERT_EXPIRY_WARNING else self.log.info
        emit(
            "peer links use mutual TLS: certificate of node {node} valid until {expires}"
            " UTC ({days} days left)",
            node=self.node_id,
            expires=f"{expires:%Y-%m-%d %H:%M}",
            days=left.days,
        )

    def stopService(self) -> Deferred[None] | None:
        """Close the links and the store. With the dynamic overlay the node first says
        it leaves (queued before the links close, so the neighbours replace it at once
        instead of suspecting it) and the stop waits until the connections have sent
        what they hold (at most the close grace)."""
        super().stopService()
        leaving = self.core.overlay is not None and self.links.running
        if leaving:
            self._apply(self.core.leave(self.clock.seconds()))
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._cooperator.stop()
        self.links.stop()
        self.store.close()
        if leaving:
            return self.links.when_all_closed(self.links.close_grace)
        return None

    # -- client operations -------------------------------------------------

    def submit(self, body: bytes) -> Deferred[tuple[bytes, bool]]:
        """Accept a message; fires with (id, new) once it is stored (raises SubmitRejected,
        or StoreError once the store has failed, or SubmitBusy while a neighbour's link is
        full and enough submits wait; the Deferred fails with StoreError if the store
        fails before the record is durable)."""
        try:
            return self.submits.admit(len(body), lambda: self._submit_now(body))
        except SubmitBusy:
            self.submit_outcomes["busy"] += 1
            raise

    def _submit_now(self, body: bytes) -> Deferred[tuple[bytes, bool]]:
        accepted = self._accept(body, self.clock.seconds())
        # Acknowledged only once durable under the fsync policy (a resubmit of a
        # held message also waits: its first submit may not be durable yet).
        return self.store.when_durable().addCallback(lambda _: accepted)

    def submit_many(self, bodies: list[bytes]) -> Deferred[list[tuple[bytes, bool] | str]]:
        """Accept several messages; fires, once all are stored, with (id, new) for each
        accepted body and the reason for each refused one, in order (waits, or raises
        SubmitBusy, as ``submit`` does)."""
        return self.submit_each(bodies).addCallback(_refusal_texts)

    def submit_each(self, bodies: list[bytes]) -> Deferred[list[tuple[bytes, bool] | Exception]]:
        """``submit_many`` with each refusal as its exception (``SubmitRejected``, or
        ``StoreError`` once the store failed), as ``submit`` would raise it. The bodies
        enter the core as one batch (``GossipCore.submit_many``): their new messages
        reach the store and the neighbours' outboxes together."""
        size = sum(map(len, bodies))
        try:
            return self.submits.admit(size, lambda: self._submit_each_now(bodies))
        except SubmitBusy:
            self.submit_outcomes["busy"] += len(bodies)
            raise

    def _submit_each_now(
        self, bodies: list[bytes]
    ) -> Deferred[list[tuple[bytes, bool] | Exception]]:
        results = self._accept_many(bodies, self.clock.seconds())
        return self.store.when_durable().addCallback(lambda _: results)

    def _accept_many(self, bodies: list[bytes], now: float) -> list[tuple[bytes, bool] | Exception]:
        """``_accept`` of each body, as one batch into the core, its effects carried out."""
        outcomes = self.submit_outcomes
        if self.failed is not None:
            outcomes["failed"] += len(bodies)
            return [StoreError(self.failed) for _ in bodies]
        batch = self.core.submit_many(bodies, now)
        self._apply(batch.effects)
        results: list[tuple[bytes, bool] | Exception] = []
        for r in batch.results:
            if isinstance(r, SubmitRejected):
                outcomes["rejected"] += 1
                results.append(r)
            elif self.failed is not None:
                outcomes["failed"] += 1
                results.append(StoreError(self.failed))
            else:
                outcomes["stored" if r[1] else "duplicate"] += 1
                results.append(r)
        return results

    def _accept(self, body: bytes, now: float) -> tuple[bytes, bool]:
        """One submit into the core, its effects carried out: (id, new)."""
        outcomes = self.submit_outcomes
        if self.failed is not None:
            outcomes["failed"] += 1
            raise StoreError(self.failed)
        try:
            result = self.core.submit(body, now)
        except SubmitRejected:
            outcomes["rejected"] += 1
            raise
        self._apply(result.effects)
        if self.failed is not None:
            outcomes["failed"] += 1
            raise StoreError(self.failed)
        outcomes["stored" if result.new else "duplicate"] += 1
        return result.id, result.new

    def find(self, prefix: str, limit: int) -> list[Message]:
        lo, hi = id_range(prefix)
        out = []
        for mid in self.store.ids_between(lo, hi, limit):
            m = self.store.get(mid)
            if m is not None:
                out.append(m)
        return out

    def arrivals(self, since: float, before: int, limit: int) -> tuple[list[Message], int]:
        """Up to ``limit`` messages stored at or after ``since``, newest first, from
        position ``before`` down (-1: the newest); and where the next page starts (-1:
        done). Arrival order follows this node's clock, so the walk stops at the first
        older message."""
        end = len(self.store) if before < 0 else min(before, len(self.store))
        start = max(0, end - limit)
        out: list[Message] = []
        ids = self.store.ids_from(start, end - start)
        for mid in reversed(ids):
            m = self.store.get(mid)
            if m is None:
                continue
            if m.received_at < since:
                return out, -1
            out.append(m)
        return out, (start if start > 0 else -1)

    def client_connections(self) -> int:
        """Client (AMP) connections open on this node's client ports."""
        return sum(port.open for port in self.client_ports)

    def message_count(self) -> int:
        return len(self.store)

    def status(self) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "node_id": self.node_id,
            "cluster": self.config.name,
            "dissemination": self.config.dissemination,
            "message_count": len(self.store),
            "uptime": self.clock.seconds() - self.started_at,
            "pid": os.getpid(),
            "traffic": self.traffic.rows(),
            "sync": [attrs.asdict(self.core.sync.counters)],
            # Messages dropped (links kept) for a path or size this node must refuse.
            "refused": [{"reason": r, "count": n} for r, n in self.core.refused.items()],
            # Peer connections closed for breaking the rules, by reason.
            "disconnects": [
                {"reason": r, "count": n} for r, n in sorted(self.links.disconnects.items())
            ],
            "store": [
                {
                    "policy": stats["policy"],
                    "durable": self.store.durable_count(),
                    "fsyncs": stats["fsyncs"],
                    "last_fsync_seconds": stats["last_fsync_seconds"],
                }
            ],
            **self._overlay_status(),
            "links": [
                {
                    "peer": s.peer,
                    "address": s.address,
                    "state": s.state,
                    "since": s.since,
                    "times_up": s.times_up,
                    "last_error": s.last_error,
                    "times_down": s.times_down,
                    "recent_downs": list(s.recent_downs),
                }
                for s in self.links.status()
            ],
        }

    def _overlay_status(self) -> dict[str, Any]:
        """The dynamic overlay's part of the status (nothing with the static one)."""
        overlay = self.core.overlay
        if overlay is None:
            return {}
        return {"overlay": [overlay.status(self.clock.seconds())]}

    # -- events into the core ----------------------------------------------

    def _peer_up(self, peer: int) -> None:
        self._apply(self.core.peer_up(peer, self.clock.seconds()))

    def _peer_down(self, peer: int) -> None:
        self._congestion(peer, False)
        self.sync_streams.peer_down(peer)
        self._apply(self.core.peer_down(peer, self.clock.seconds()))

    def _congestion(self, peer: int, full: bool) -> None:
        if full:
            # A link reports "full" again only after its transport drained and filled
            # up again (nothing is written to a full one): progress, so count afresh.
            self._congested[peer] = self.clock.seconds()
            self.submits.close()
        else:
            self._congested.pop(peer, None)
            if not self._congested:
                self.submits.open()

    @property
    def congested(self) -> bool:
        return bool(self._congested)

    def _drop_stalled_links(self, now: float) -> None:
        """Drop a link that stayed full ``LINK_STALL_SECONDS`` without draining: its
        neighbour is not reading, and holding on would hold every new submit. Time the
        reactor stood still (SIGSTOP) does not count: it could not write meanwhile."""
        for peer, since in list(self._congested.items()):
            if now - self.links.pauses.running_since(since) >= LINK_STALL_SECONDS:
                self.links.drop(
                    peer, f"link full for {LINK_STALL_SECONDS:g} s without draining", NOT_READING
                )
                self._congestion(peer, False)  # what is sent to it from now on is dropped

    def _frame(self, peer: int, frame: PeerFrame, size: int) -> None:
        self.traffic.received(peer, frame, size)
        self._apply(self.core.receive(peer, frame, self.clock.seconds()))

    def tick(self) -> None:
        """Let the core act on time (re-sync schedule, Plumtree timers): every TICK_SECONDS;
        drop links that stayed full without draining."""
        now = self.clock.seconds()
        if self._congested:
            self._drop_stalled_links(now)
        self._apply(self.core.tick(now))

    # -- effects out -------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        # Encodings by frame object: a frame sent to several peers is encoded once.
        encoded: dict[int, bytes] = {}
        pieces: dict[int, list[bytes]] = {}
        for effect in effects:
            if isinstance(effect, Persist | PersistBatch):
                try:
                    if isinstance(effect, Persist):
                        self.store.add(effect.message)
                    else:
                        self.store.add_many(
                            effect.ids, effect.bodies, effect.paths, effect.received_at
                        )
                except StoreError as e:
                    self._store_failed(e)
                    return  # nothing after a failed Persist: its sends least of all
                if self.watchers and self._flush_call is None:
                    # Watchers hear of these at the end of the turn (or once durable),
                    # also when nothing is sent on (a leaf of the tree).
                    self._flush_call = self.clock.callLater(0, self.flush)
            elif isinstance(effect, Send) and isinstance(effect.frame, GossipFrame):
                # Batched: every payload for a peer within one reactor turn goes out
                # as one frame, so per-frame costs are paid once under load.
                key = id(effect.frame)
                entries = pieces.get(key)
                if entries is None:
                    entries = pieces[key] = codec.gossip_pieces(effect.frame)
                box = self._outbox.get(effect.peer)
                if box is None:
                    box = self._outbox[effect.peer] = []
                box += entries
                if self._flush_call is None:
                    self._flush_call = self.clock.callLater(0, self.flush)
            elif isinstance(effect, Send):
                key = id(effect.frame)
                data = encoded.get(key)
                if data is None:
                    data = encoded[key] = codec.encode(effect.frame)
                if self.links.send(effect.peer, data):
                    self.traffic.sent(effect.peer, effect.frame, len(data))
            elif isinstance(effect, StreamMessages):
                self.sync_streams.order(effect)
            elif isinstance(effect, DropPeer):
                self.links.drop(effect.peer, effect.reason, effect.kind)
            elif isinstance(effect, Dial):
                self.links.add_peer(effect.peer, effect.address)
            elif isinstance(effect, Hangup):
                self.links.remove_peer(effect.peer, effect.reason)

    def _store_failed(self, error: StoreError) -> None:
        """The log cannot take records (disk full, failed fsync): the node must stop, as
        a database stops on a failed fsync; a restart recovers the log and re-sync
        fetches what it missed. Until it stops it sends no payload and refuses every
        submit; what a failed write lost, the store no longer holds."""
        if self.failed is not None:
            return
        self.failed = str(error)
        self._outbox.clear()
        self.log.critical("node {node} stops: {reason}", node=self.node_id, reason=self.failed)
        if self.on_fatal is not None:
            self.on_fatal(self.failed)

    def flush(self) -> None:
        """Write what the store buffered, then send the batched payloads (scheduled for
        the end of the reactor turn that queued them), then tell watchers what became
        durable (after: forwarding comes first)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._outbox:
            outbox, self._outbox = self._outbox, {}
            try:
                self.store.write_buffered()  # persist before send
            except StoreError as e:
                self._store_failed(e)
                return
            for peer, entries in outbox.items():
                for data, count in codec.gossip_frames(entries, GOSSIP_FRAME_BYTES):
                    if self.links.send(peer, data):
                        self.traffic.sent_kind(peer, "gossip", len(data), count)
        if self.watchers:
            self.notify_watchers()

    def notify_watchers(self) -> None:
        """Push newly durable ids to watchers; wait for the store to make the rest durable.

        Only watchers that can take more are in ``watchers``, and each was pushed up to
        ``_watchers_told`` (a new or drained one catches up by itself), so a flush that
        made nothing new durable costs nothing however many watchers there are."""
        durable = self.store.durable_count()
        if durable != self._watchers_told:
            self._watchers_told = durable
            for w in list(self.watchers):
                w.push_delivered()
        self._await_durability()

    def watcher_ready(self, watcher: Any) -> None:
        """A watching connection can take pushes (it just asked, or its socket drained)."""
        self.watchers.add(watcher)
        watcher.push_delivered()
        self._await_durability()

    def _await_durability(self) -> None:
        if not self._durability_wait and self.store.durable_count() < len(self.store):
            self._durability_wait = True
            self.store.when_durable().addBoth(self._durability_advanced)

    def _durability_advanced(self, result: object) -> None:
        # A failed fsync is the store's to report (it refuses appends from then on).
        self._durability_wait = False
        if self.watchers and not isinstance(result, Failure):
            self.notify_watchers()
