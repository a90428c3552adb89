"""Observability: the /metrics endpoint, JSON logs, gclient's --json, --trace, --follow
and --cluster-stats, against nodes running in this process over loopback."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from clusterlib import wait_for
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, readBody

from gossip import logs
from gossip.client import cli
from gossip.client.analytics import percentile, trace, window_stats
from gossip.client.api import GossipClient
from gossip.cluster import free_port_base
from gossip.config import ClusterConfig, dump_config, parse_config
from gossip.core.arrivals import UNKNOWN, VIAS, Arrivals
from gossip.latency import LatencyHistogram
from gossip.node import GossipNode
from gossip.store.memory import MemoryStore
from gossip.tap import Options, node_services
from gossip.topology import generate_config

N = 4


def _config() -> ClusterConfig:
    base = free_port_base(3 * N + 1)
    config = generate_config(N, base_peer_port=base, base_client_port=base + N)
    nodes = {
        i: attrs.evolve(s, web_listen=f"tcp:{base + 2 * N + i}:interface=127.0.0.1")
        for i, s in config.nodes.items()
    }
    return parse_config(dump_config(attrs.evolve(config, nodes=nodes)))


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Any) -> AsyncIterator[tuple[ClusterConfig, Any]]:
    from twisted.internet import reactor

    config = _config()
    path = tmp_path / "cluster.toml"
    path.write_text(dump_config(config))
    tops = []
    for i in config.nodes:
        top = node_services(GossipNode(config, i, MemoryStore(), reactor), reactor)
        top.privilegedStartService()
        top.startService()
        tops.append(top)

    async def all_up() -> bool:
        return all(
            link.state == "up"
            for top in tops
            for link in top.getServiceNamed("node").links.links.values()
        )

    await wait_for(reactor, all_up, 10, "every link up")
    yield config, (path, tops)
    for top in tops:
        await top.stopService()


async def _get(url: str) -> tuple[int, dict[str, list[str]], bytes]:
    from twisted.internet import reactor

    response = await Agent(reactor).request(b"GET", url.encode())
    body = await readBody(response)
    headers = {
        k.decode(): [v.decode() for v in vs] for k, vs in response.headers.getAllRawHeaders()
    }
    return response.code, headers, body


async def _gclient(path: Any, *argv: str) -> tuple[int, str]:
    """Run gclient's main in a thread (it runs its own react loop only in a process), so
    here its coroutine runs on this reactor: call ``cli._run`` directly instead."""
    from twisted.internet import reactor

    args = cli.parser().parse_args(["--config", str(path), *argv])
    config = cli.load_config(path)
    out = io.StringIO()
    real = cli.sys.stdout
    cli.sys.stdout = out
    try:
        await cli._run(reactor, config, args)
        code = 0
    except cli.CliError as e:
        out.write(f"error: {e}\n")
        code = e.code
    finally:
        cli.sys.stdout = real
    return code, out.getvalue()


@pytest_twisted.ensureDeferred
async def test_metrics_endpoint_serves_valid_exposition_with_the_expected_names(
    cluster: Any,
) -> None:
    """GET /metrics on a node's web_listen (a real loopback port) answers 200 with the
    Prometheus text format: prometheus_client's parser reads it, and it carries the
    node's counters (a submitted message counted as stored and sent per neighbour and
    kind, links up, the client connection) under conventional names."""
    from twisted.internet import reactor

    config, _ = cluster
    client = await GossipClient.connect_node(reactor, 1, config)
    try:
        await client.submit_message("metrics please")
        port = config.node(1).web_listen.split(":")[1]
        code, headers, body = await _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        client.close()
    assert code == 200
    assert headers["Content-Type"][0].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in (
        "gossip_messages_stored",
        "gossip_duplicates_dropped",
        "gossip_submits",
        "gossip_peer_frames_sent",
        "gossip_peer_sent_bytes",
        "gossip_link_up",
        "gossip_link_flaps",
        "gossip_store_durable_lag_messages",
        "gossip_resync_sessions",
        "gossip_resync_bytes",
        "gossip_client_connections",
        "gossip_queue_depth",
    ):
        assert name in families, name
    assert families["gossip_messages_stored"].type == "counter"

    def value(name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[name].samples
            if s.name == name + ("_total" if families[name].type == "counter" else "")
            and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("gossip_messages_stored", via="submit") == 1
    assert value("gossip_submits", outcome="stored") == 1
    assert value("gossip_link_up") == len(config.node(1).neighbours)
    assert value("gossip_peer_frames_sent", kind="gossip") >= 1
    assert value("gossip_client_connections") == 1
    code, headers, index = await _get(f"http://127.0.0.1:{port}/")
    assert code == 302 and headers["Location"] == ["dashboard/"]
    assert b"/metrics" in index and b"/dashboard" in index


def test_fsync_histogram_buckets_are_cumulative() -> None:
    """The store's fsync histogram puts each observation in the first bucket whose bound
    is not below it, and reports cumulative counts ending with +Inf = count."""
    h = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 2.0):
        h.observe(seconds)
    assert h.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == pytest.approx(2.0065)


def test_arrivals_count_redundant_copies_of_recent_messages_only() -> None:
    """Redundant copies are counted per message while it is among the recent ones, a
    client's resubmit is no redundant copy, and a forgotten message reports UNKNOWN."""
    a = Arrivals(limit=2)
    a.stored_new(b"a", "gossip")
    a.duplicate(b"a", "gossip")
    a.duplicate(b"a", "sync")
    a.duplicate(b"a", "submit")
    assert a.of(b"a") == ("gossip", 2)
    a.stored_new(b"b", "submit")
    a.stored_new(b"c", "sync")
    assert a.of(b"a") == ("", UNKNOWN)
    assert a.stored == {"submit": 1, "gossip": 1, "sync": 1}
    assert a.duplicates == {"submit": 1, "gossip": 1, "sync": 1}


@given(
    limit=st.integers(1, 9),
    batches=st.lists(st.tuples(st.integers(0, 25), st.sampled_from(VIAS)), max_size=30),
)
def test_arrivals_remember_exactly_the_last_stored_messages(
    limit: int, batches: list[tuple[int, str]]
) -> None:
    """Whatever the sizes of the batches stored (empty, across the end of the ring, larger
    than ``limit``), the ``limit`` most recently stored messages are known with their
    route and redundant copies, every older one is UNKNOWN, and no more than ``limit``
    are held."""
    a = Arrivals(limit=limit)
    stored: list[tuple[bytes, str]] = []
    copies: dict[bytes, int] = {}
    for size, via in batches:
        mids = tuple(b"%d" % (len(stored) + k) for k in range(size))
        a.stored_many(mids, via)
        stored += [(mid, via) for mid in mids]
        if stored:
            a.duplicate(stored[-1][0], "gossip")
            copies[stored[-1][0]] = copies.get(stored[-1][0], 0) + 1
        recent = stored[-limit:]
        assert [a.of(mid) for mid, _ in recent] == [(v, copies.get(m, 0)) for m, v in recent]
        assert all(a.of(mid) == ("", UNKNOWN) for mid, _ in stored[:-limit])
        assert len(a._recent) <= limit
    assert sum(a.stored.values()) == len(stored)


def test_arrivals_of_a_frame_past_the_limit_keep_the_newest() -> None:
    """A frame's messages stored at once (``stored_many``) push out the oldest ones,
    however many go at a time: the newest ``limit`` are remembered, in order."""
    a = Arrivals(limit=3)
    a.stored_many((b"a", b"b"), "gossip")
    a.stored_many((b"c", b"d", b"e", b"f"), "sync")
    assert [a.of(m) for m in (b"a", b"b", b"c")] == [("", UNKNOWN)] * 3
    assert [a.of(m) for m in (b"d", b"e", b"f")] == [("sync", 0)] * 3
    a.stored_many((b"g",), "gossip")
    assert a.of(b"d") == ("", UNKNOWN) and a.of(b"g") == ("gossip", 0)
    assert a.stored == {"submit": 0, "gossip": 3, "sync": 4}


def test_json_logs_are_one_object_per_line_with_the_stable_keys() -> None:
    """--log-format json: every event is one JSON line with node, peer and msg_id (null
    when the event names none; node defaults to the process's node) and its text."""
    out = io.StringIO()
    log = Logger(observer=logs.observer_for("json", out))
    logs.set_node(7)
    log.info("link to node {peer} up", node=3, peer=4)
    log.warn("torn tail in {path}", path="/x")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["node"], e["peer"], e["msg_id"]) for e in lines] == [(3, 4, None), (7, None, None)]
    assert lines[0]["text"] == "link to node 4 up"


def test_log_format_option_is_checked(tmp_path: Any) -> None:
    """gossip-node / twistd gossip take --log-format text|json and refuse anything else."""
    from twisted.python import usage

    path = tmp_path / "c.toml"
    path.write_text(dump_config(generate_config(4)))
    o = Options()
    o.parseOptions(["--id", "1", "--config", str(path), "--log-format", "json", "--memory"])
    assert o["log-format"] == "json"
    with pytest.raises(usage.UsageError, match="--log-format"):
        Options().parseOptions(["--id", "1", "--config", str(path), "--log-format", "xml"])


@pytest_twisted.ensureDeferred
async def test_gclient_json_outputs_parse(cluster: Any) -> None:
    """--status, --list, --msgID and --message with --json print JSON that parses and
    carries the node's figures and the message."""
    _, (path, _) = cluster
    code, out = await _gclient(path, "--id", "1", "--message", "Apple", "--json")
    assert code == 0
    mid = json.loads(out)["id"]
    code, out = await _gclient(path, "--id", "1", "--msgID", mid[:10], "--json")
    assert json.loads(out)["body"] == "Apple" and json.loads(out)["hops"] == 0
    code, out = await _gclient(path, "--id", "1", "--list", "--json")
    assert json.loads(out) == [{"id": mid, "body": "Apple"}]
    code, out = await _gclient(path, "--id", "1", "--status", "--json")
    status = json.loads(out)
    assert status["node_id"] == 1 and status["message_count"] == 1


@pytest_twisted.ensureDeferred
async def test_trace_reports_every_node_with_hops_path_and_coverage(cluster: Any) -> None:
    """--trace asks every node: the origin has 0 hops, every other node's path starts at
    the origin and ends at itself with hops = path length - 1, and once all hold it the
    time to full coverage is the spread of arrival times."""
    from twisted.internet import reactor

    _, (path, tops) = cluster
    code, out = await _gclient(path, "--id", "2", "--message", "Banana", "--json")
    mid = json.loads(out)["id"]

    async def everywhere() -> bool:
        return all(top.getServiceNamed("node").message_count() == 1 for top in tops)

    await wait_for(reactor, everywhere, 10, "the message on every node")
    code, out = await _gclient(path, "--id", "3", "--trace", mid[:8], "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["holding"] == N and report["full_coverage_seconds"] >= 0
    by_node = {c["node"]: c for c in report["copies"]}
    assert by_node[2]["hops"] == 0 and by_node[2]["via"] == "submit"
    for n, c in by_node.items():
        assert c["path"][0] == 2 and c["path"][-1] == n and c["hops"] == len(c["path"]) - 1
        assert c["redundant_copies"] >= 0
    code, text = await _gclient(path, "--id", "3", "--trace", mid[:8])
    assert f"on {N} of {N} nodes" in text


@pytest_twisted.ensureDeferred
async def test_cluster_stats_counts_messages_coverage_and_spread(cluster: Any) -> None:
    """--cluster-stats over a window sees the messages submitted in it at full coverage
    and reports time-to-coverage percentiles; --json parses."""
    from twisted.internet import reactor

    _, (path, tops) = cluster
    for body in ("one", "two", "three"):
        await _gclient(path, "--id", "1", "--message", body)

    async def everywhere() -> bool:
        return all(top.getServiceNamed("node").message_count() == 3 for top in tops)

    await wait_for(reactor, everywhere, 10, "every message on every node")
    code, out = await _gclient(path, "--cluster-stats", "--window", "60", "--json")
    assert code == 0, out
    stats = json.loads(out)
    assert stats["messages"] == 3 and stats["fully_covered"] == 3
    assert stats["mean_coverage"] == 1.0 and stats["nodes_reporting"] == N
    assert stats["full_coverage_seconds_p99"] >= stats["full_coverage_seconds_p50"] >= 0
    _, text = await _gclient(path, "--cluster-stats", "--window", "60")
    assert "time to full coverage" in text


@pytest_twisted.ensureDeferred
async def test_follow_prints_messages_as_they_arrive(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--follow prints each message the node receives after it started (not the ones it
    held before), as a JSON line with its hops and path."""
    from twisted.internet import reactor, task

    config, (path, _) = cluster
    await _gclient(path, "--id", "1", "--message", "before")
    lines: list[str] = []
    monkeypatch.setattr(cli, "_out", lines.append)
    client = await GossipClient.connect_node(reactor, 4, config)
    args = cli.parser().parse_args(["--id", "4", "--follow", "--json"])
    follow = defer.ensureDeferred(cli._follow(client, args))
    follow.addErrback(lambda f: f.trap(defer.CancelledError))
    try:
        await task.deferLater(reactor, 0.5)
        sender = await GossipClient.connect_node(reactor, 1, config)
        await sender.submit_message("Cherry")
        sender.close()

        async def printed() -> bool:
            return bool(lines)

        await wait_for(reactor, printed, 10, "--follow to print the message")
    finally:
        follow.cancel()
        client.close()
    got = [json.loads(line) for line in lines]
    assert [m["body"] for m in got] == ["Cherry"]
    assert got[0]["path"][0] == 1 and got[0]["hops"] == len(got[0]["path"])


def test_summaries_are_honest_about_missing_data() -> None:
    """Pure summaries: a node without the message makes coverage partial and no full
    coverage time; unknown redundant counts give None, not zero; percentiles are
    nearest-rank."""
    copies = {
        1: {"received_at": 10.0, "path": [], "via": "submit", "duplicates": 0},
        2: {"received_at": 10.5, "path": [1], "via": "gossip", "duplicates": -1},
        3: None,
    }
    r = trace(copies, [1, 2, 3])
    assert r["holding"] == 2 and r["full_coverage_seconds"] is None
    assert r["redundant_copies"] is None
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4
    rows = {
        1: [
            {"id": "m", "received_at": 5.0, "path": [], "via": "submit", "duplicates": 0, "size": 3}
        ],
        2: [
            {"id": "m", "received_at": 5.2, "path": [1], "via": "sync", "duplicates": 1, "size": 3}
        ],
    }
    links = {1: {"links": [{"recent_downs": [1.0, 4.5]}]}, 2: {"links": []}}
    s = window_stats(rows, links, [1, 2], since=4.0)
    assert s["messages"] == 1 and s["fully_covered"] == 1
    assert s["full_coverage_seconds_p50"] == pytest.approx(0.2)
    assert s["redundant_copies_per_message"] == 1 and s["link_flaps"] == 1
    assert s["resync_messages"] == 1 and s["resync_body_bytes"] == 3


@pytest_twisted.ensureDeferred
async def test_follow_that_falls_behind_stops_with_one_line(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--follow holds at most FOLLOW_BACKLOG ids not yet printed: a follower that falls
    further behind stops with one line saying so instead of queueing without bound."""
    from twisted.internet import reactor

    config, _ = cluster
    monkeypatch.setattr(cli, "FOLLOW_BACKLOG", 0)
    monkeypatch.setattr(cli, "_out", lambda line: None)
    client = await GossipClient.connect_node(reactor, 4, config)
    args = cli.parser().parse_args(["--id", "4", "--follow"])
    follow = defer.ensureDeferred(cli._follow(client, args))
    try:
        sender = await GossipClient.connect_node(reactor, 1, config)
        await sender.submit_message("Damson")
        sender.close()
        with pytest.raises(cli.CliError, match="behind"):
            await follow.addTimeout(10, reactor)
    finally:
        client.close()
