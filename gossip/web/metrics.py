"""Prometheus metrics of one node, read from the node's own counters at scrape time.

``NodeCollector`` is a custom collector: nothing on the hot path touches
Prometheus. The node already counts what matters in plain integers (frames
and bytes per neighbour and kind in ``gossip.traffic``, stored messages and
redundant copies in ``gossip.core.arrivals``, re-sync sessions in the core's
``SyncCounters``, link ups and downs in the link table, submits by outcome,
fsync latencies in the store's ``LatencyHistogram``); a scrape turns those
into metric families. So a scrape costs O(neighbours x frame kinds), and a
message costs no more than before.

The collector reads node state that only the reactor thread changes, so it
must run in the reactor thread: ``gossip.web.site`` renders the exposition
there (``prometheus_client.twisted.MetricsResource`` would run it in the
thread pool, racing the reactor).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gossip.core.arrivals import VIAS
from gossip.net.links import UP
from gossip.traffic import SYNC_KINDS

if TYPE_CHECKING:
    from gossip.node import GossipNode

LINK_STATES = ("connecting", "up", "down")


class NodeCollector:
    """Every gossip_* metric of ``node``; register it in a registry of the node's own."""

    def __init__(self, node: GossipNode) -> None:
        self.node = node

    def describe(self) -> list[Metric]:
        return []  # names are fixed below; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        node = self.node
        core = node.core
        arrivals = core.arrivals

        info = GaugeMetricFamily(
            "gossip_node_info",
            "This node's id, cluster and strategy",
            labels=["node", "cluster", "dissemination"],
        )
        info.add_metric([str(node.node_id), node.config.name, node.config.dissemination], 1)
        yield info
        yield GaugeMetricFamily(
            "gossip_uptime_seconds",
            "Seconds since the node started",
            value=max(0.0, node.clock.seconds() - node.started_at) if node.started_at else 0.0,
        )

        held = GaugeMetricFamily("gossip_messages_held", "Messages in this node's store")
        held.add_metric([], len(node.store))
        yield held
        stored = CounterMetricFamily(
            "gossip_messages_stored",
            "New messages stored since start, by how they came (submit, gossip, sync)",
            labels=["via"],
        )
        for via in VIAS:
            stored.add_metric([via], arrivals.stored[via])
        yield stored
        dup = CounterMetricFamily(
            "gossip_duplicates_dropped",
            "Copies of messages already held, dropped (submit: a client's resubmit)",
            labels=["via"],
        )
        for via in VIAS:
            dup.add_metric([via], arrivals.duplicates[via])
        yield dup
        refused = CounterMetricFamily(
            "gossip_messages_refused",
            "Messages dropped for a path or size this node must refuse (links kept)",
            labels=["reason"],
        )
        for reason, n in sorted(core.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        submits = CounterMetricFamily(
            "gossip_submits", "Client submits by outcome", labels=["outcome"]
        )
        for outcome, n in node.submit_outcomes.items():
            submits.add_metric([outcome], n)
        yield submits

        yield from self._traffic()
        yield from self._links()
        yield from self._store()
        yield from self._resync()

        clients = GaugeMetricFamily("gossip_client_connections", "Open client (AMP) connections")
        clients.add_metric([], node.client_connections())
        yield clients
        watchers = GaugeMetricFamily(
            "gossip_watchers", "Client connections following deliveries that can take more"
        )
        watchers.add_metric([], len(node.watchers))
        yield watchers
        yield from self._queues()
        yield from self._overlay()

    def _overlay(self) -> Iterator[Metric]:
        """The dynamic overlay (nothing with the static one)."""
        overlay = self.node.core.overlay
        if overlay is None:
            return
        for name, doc, value in (
            ("gossip_overlay_neighbours", "Neighbours the node counts", overlay.degree),
            (
                "gossip_overlay_suspects",
                "Neighbours whose link is down, not yet replaced",
                len(overlay.suspects),
            ),
            ("gossip_overlay_live_nodes", "Nodes in the live graph", len(overlay.graph)),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        changes = CounterMetricFamily(
            "gossip_overlay_changes", "Changes of the neighbour set (status lists the last)"
        )
        changes.add_metric([], overlay.change_count)
        yield changes
        bad = CounterMetricFamily(
            "gossip_overlay_bad_records", "Node records dropped as malformed", labels=["reason"]
        )
        for reason, n in overlay.bad_records.items():
            bad.add_metric([reason], n)
        yield bad

    def _traffic(self) -> Iterator[Metric]:
        labels = ["peer", "kind"]
        families = {
            name: CounterMetricFamily(f"gossip_peer_{name}", doc, labels=labels)
            for name, doc in (
                ("frames_sent", "Frames sent to a neighbour, by frame kind"),
                ("frames_received", "Frames received from a neighbour, by frame kind"),
                ("sent_bytes", "Frame bytes sent to a neighbour, by frame kind"),
                ("received_bytes", "Frame bytes received from a neighbour, by frame kind"),
                ("messages_sent", "Message copies sent to a neighbour (gossip, sync_data)"),
                ("messages_received", "Message copies received from a neighbour"),
            )
        }
        for (peer, kind), c in sorted(self.node.traffic.per_peer.items()):
            key = [str(peer), kind]
            families["frames_sent"].add_metric(key, c.frames_out)
            families["frames_received"].add_metric(key, c.frames_in)
            families["sent_bytes"].add_metric(key, c.bytes_out)
            families["received_bytes"].add_metric(key, c.bytes_in)
            families["messages_sent"].add_metric(key, c.messages_out)
            families["messages_received"].add_metric(key, c.messages_in)
        yield from families.values()

    def _links(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "gossip_link_up", "1 while the link to a neighbour is up", labels=["peer"]
        )
        state = GaugeMetricFamily(
            "gossip_link_state",
            "The link's state (1 for the current one)",
            labels=["peer", "state"],
        )
        ups = CounterMetricFamily(
            "gossip_link_ups", "Times the link to a neighbour came up", labels=["peer"]
        )
        flaps = CounterMetricFamily(
            "gossip_link_flaps", "Times an up link to a neighbour went down", labels=["peer"]
        )
        since = GaugeMetricFamily(
            "gossip_link_state_since_seconds",
            "When the link entered its state (Unix time)",
            labels=["peer"],
        )
        for s in self.node.links.status():
            peer = str(s.peer)
            up.add_metric([peer], 1 if s.state == UP else 0)
            for name in LINK_STATES:
                state.add_metric([peer, name], 1 if s.state == name else 0)
            ups.add_metric([peer], s.times_up)
            flaps.add_metric([peer], s.times_down)
            since.add_metric([peer], s.since)
        yield from (up, state, ups, flaps, since)

    def _store(self) -> Iterator[Metric]:
        store = self.node.store
        stats = store.stats()
        durable = store.durable_count()
        yield GaugeMetricFamily(
            "gossip_store_durable_messages",
            "Messages durable under the fsync policy",
            value=durable,
        )
        yield GaugeMetricFamily(
            "gossip_store_durable_lag_messages",
            "Messages stored but not yet durable (waiting for an fsync)",
            value=len(store) - durable,
        )
        if "file_bytes" in stats:
            yield GaugeMetricFamily(
                "gossip_store_durable_lag_bytes",
                "Log bytes written or buffered but not yet fsynced",
                value=stats["file_bytes"] - stats["durable_bytes"],
            )
            yield GaugeMetricFamily(
                "gossip_store_file_bytes", "Size of the message log", value=stats["file_bytes"]
            )
        yield CounterMetricFamily(
            "gossip_store_fsyncs", "fsyncs of the message log", value=stats["fsyncs"]
        )
        latency = getattr(store, "fsync_latency", None)
        if latency is not None:
            h = HistogramMetricFamily(
                "gossip_store_fsync_seconds", "Time each fsync of the message log took"
            )
            h.add_metric([], latency.cumulative(), sum_value=latency.sum)
            yield h

    def _resync(self) -> Iterator[Metric]:
        counters = self.node.core.sync.counters
        sessions = CounterMetricFamily(
            "gossip_resync_sessions",
            "Re-sync sessions this node started, by outcome",
            labels=["outcome"],
        )
        sessions.add_metric(["started"], counters.sessions_started)
        sessions.add_metric(["completed"], counters.sessions_completed)
        sessions.add_metric(["aborted"], counters.sessions_aborted)
        yield sessions
        yield CounterMetricFamily(
            "gossip_resync_messages_pulled",
            "Messages this node pulled by re-sync",
            value=counters.messages_pulled,
        )
        volume = CounterMetricFamily(
            "gossip_resync_bytes",
            "Bytes of re-sync frames, by direction",
            labels=["direction"],
        )
        out = inn = 0
        for (_, kind), c in self.node.traffic.per_peer.items():
            if kind in SYNC_KINDS:
                out += c.bytes_out
                inn += c.bytes_in
        volume.add_metric(["sent"], out)
        volume.add_metric(["received"], inn)
        yield volume

    def _queues(self) -> Iterator[Metric]:
        node = self.node
        depth = GaugeMetricFamily(
            "gossip_queue_depth",
            "Entries waiting in the node's bounded queues",
            labels=["queue"],
        )
        depth.add_metric(["outbox_messages"], sum(len(b) for b in node._outbox.values()))
        depth.add_metric(["waiting_submits"], node.submits.waiting)
        depth.add_metric(
            ["resync_answers"], sum(node.sync_streams.queued(p) for p in node.spec.neighbours)
        )
        yield depth
        pending = GaugeMetricFamily(
            "gossip_peer_pending_bytes",
            "Bytes held back for a neighbour whose link is full",
            labels=["peer"],
        )
        for link in node.links.links.values():
            proto = link.proto
            pending.add_metric([str(link.peer)], proto.pending_bytes if proto is not None else 0)
        yield pending


def node_registry(node: GossipNode) -> CollectorRegistry:
    """A registry of the node's own (never the global one: several nodes may share a
    process in tests), holding only ``NodeCollector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry
