"""``gossip-bench`` end to end on a tiny cluster: a functional check, never a timed one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]


def run_main(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``module.main(argv)`` in a child interpreter: main() runs Twisted's global
    reactor, which pytest-twisted already owns in this one."""
    code = f"import sys; from {module} import main; sys.exit(main({argv!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_bench_runs_latency_and_resync_and_reports_every_figure(tmp_path: Path) -> None:
    """``main()`` with 4 nodes runs latency and resync once each against real node
    processes, prints the table and writes JSON with every figure the spec asks for,
    with no message lost and no submit failed. It runs in a child interpreter because
    main() runs Twisted's global reactor, which pytest-twisted already owns here."""
    out = tmp_path / "bench.json"
    argv = [
        "--nodes", "4", "--workloads", "latency,resync", "--rounds", "1",
        "--latency-messages", "20", "--resync-messages", "200", "--throughput-seconds", "1",
        "--seed", "7", "--dir", str(tmp_path / "work"), "--json", str(out),
    ]  # fmt: skip
    r = run_main("gossip.bench.cluster", argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "p50 to last node (ms)" in r.stdout and "catch-up from restart (s)" in r.stdout

    doc = json.loads(out.read_text())
    assert {"machine", "commit", "settings", "runs", "summary"} <= doc.keys()
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["python"]
    assert [(run["workload"], run["strategy"], run["round"]) for run in doc["runs"]] == [
        ("latency", "flood", 1),
        ("resync", "flood", 1),
    ]
    common = {
        "payload_frames_per_message",
        "payload_messages_per_message",
        "control_frames_per_message",
        "wire_bytes_per_message",
        "cpu_seconds_per_1000",
        "rss_peak_max_mb",
        "rss_peak_mean_mb",
        "undelivered_pairs",
        "submit_errors",
    }
    latency, resync = (run["figures"] for run in doc["runs"])
    assert common | {"latency_p50_ms", "latency_p99_ms", "latency_max_ms"} <= latency.keys()
    assert common | {"catchup_seconds", "payload_bytes_ratio", "payload_frames_ratio"} <= (
        resync.keys()
    )
    assert latency["messages"] == 20 and resync["missed_messages"] == 200
    for figures in (latency, resync):
        assert figures["undelivered_pairs"] == 0
        assert figures["submit_errors"] == 0
        assert figures["all_delivered"] is True
    # Every message crossed at least one link; the restarted node got at least what it missed.
    assert latency["payload_messages_per_message"] >= 1
    assert resync["payload_messages_ratio"] >= 1
    assert doc["summary"]["latency"]["latency_p50_ms"]["flood"]["values"] == [
        latency["latency_p50_ms"]
    ]
    # The work directory is removed without --keep.
    assert list((tmp_path / "work").iterdir()) == []


def test_bench_hotpath_delivers_everything_and_reports_figures(tmp_path: Path) -> None:
    """``gossip-bench-hotpath`` on 4 nodes in one process: every message reaches every
    node (the run would time out otherwise), plumtree sends fewer payloads than flood,
    and a profile is printed when asked for."""
    out = tmp_path / "hot.json"
    argv = [
        "--nodes", "4", "--messages", "300", "--rounds", "1", "--strategy", "plumtree,flood",
        "--timeout", "60", "--profile", "5", "--json", str(out), "--dir", str(tmp_path / "w"),
    ]  # fmt: skip
    r = run_main("gossip.bench.hotpath", argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "us/node-msg" in r.stdout and "ncalls" in r.stdout
    plumtree, flood = json.loads(out.read_text())
    assert (plumtree["strategy"], flood["strategy"]) == ("plumtree", "flood")
    for run in (plumtree, flood):
        assert run["messages"] == 300 and run["cpu_seconds"] > 0
    # 4 nodes: a spanning tree needs 3 sends per message; flooding needs more.
    assert 3 <= plumtree["payload_sends_per_broadcast"] < flood["payload_sends_per_broadcast"]


def test_bench_hotpath_compares_every_variant_with_the_reference_relay(tmp_path: Path) -> None:
    """The reference relay runs as a variant in the same session, the variants' order
    rotates between rounds, both workloads report figures for every run, and each node
    variant is quoted as a ratio to the relay. On 4 nodes (a complete graph) flooding
    relays send 3 + 3 * 2 = 9 copies per message."""
    out = tmp_path / "ref.json"
    argv = [
        "--nodes", "4", "--messages", "200", "--latency-messages", "10", "--rounds", "2",
        "--strategy", "reference,plumtree", "--timeout", "60", "--json", str(out),
        "--dir", str(tmp_path / "w"),
    ]  # fmt: skip
    r = run_main("gossip.bench.hotpath", argv)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert [(x["round"], x["strategy"]) for x in runs] == [
        (1, "reference"), (1, "plumtree"), (2, "plumtree"), (2, "reference"),
    ]  # fmt: skip
    for x in runs:
        assert x["messages"] == 200 and x["messages_per_second"] > 0
        assert x["latency_p50_ms"] > 0 and x["cpu_us_per_node_message"] > 0
    assert {x["payload_sends_per_broadcast"] for x in runs if x["strategy"] == "reference"} == {9.0}
    assert "ratio to the reference relay" in r.stdout
    assert "plumtree   p50 latency to the last node" in r.stdout


def test_bench_hotpath_bad_argument_is_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gossip.bench.hotpath", "--strategy", "gosip"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown strategy 'gosip'" in r.stderr


def test_bench_hotpath_relay_mode_stores_everything_and_reports_cpu(tmp_path: Path) -> None:
    """``--relay`` feeds one node in memory; it fails unless the node stored every
    message, and it reports the least and median CPU per message of its runs."""
    out = tmp_path / "relay.json"
    argv = ["--relay", "--messages", "500", "--rounds", "3", "--batch", "4", "--json", str(out)]
    r = run_main("gossip.bench.hotpath", argv)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [x["strategy"] for x in results] == ["plumtree", "flood"]
    for x in results:
        assert 0 < x["cpu_us_per_message_min"] <= x["cpu_us_per_message_median"]
        assert x["messages"] == 500 and x["batch"] == 4


def test_bench_tls_both_runs_each_strategy_without_and_with_tls(tmp_path: Path) -> None:
    """``--tls both`` runs the strategy as two variants, "flood" and "flood+tls" (peer
    links over mutual TLS with certificates made for the run), delivers every message
    in both, and the table compares them in the same run."""
    out = tmp_path / "bench.json"
    argv = [
        "--nodes", "4", "--workloads", "latency", "--rounds", "1", "--tls", "both",
        "--latency-messages", "20", "--seed", "7", "--dir", str(tmp_path / "work"),
        "--json", str(out), "--keep",
    ]  # fmt: skip
    r = run_main("gossip.bench.cluster", argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "flood+tls/flood" in r.stdout
    doc = json.loads(out.read_text())
    assert [run["strategy"] for run in doc["runs"]] == ["flood", "flood+tls"]
    for run in doc["runs"]:
        assert run["figures"]["undelivered_pairs"] == 0
    plain, tls = (Path(run["directory"]) for run in doc["runs"])
    assert "tls = false" in (plain / "cluster.toml").read_text()
    assert "tls = true" in (tls / "cluster.toml").read_text()
    logs = "".join(p.read_text() for p in tls.glob("node-*/node.log"))
    assert logs.count("peer links use mutual TLS") == 4


def test_bench_throughput_submits_in_batches_and_counts_every_message(tmp_path: Path) -> None:
    """The throughput workload with ``--batch 8`` submits through ``submit_messages``
    (one SubmitMany per call), stops at ``--max-messages`` exactly, and every message is
    seen durable at every node through Watch; the run reports the node CPU per message
    per node, the Watch pushes per message (fewer than one: pushes carry ranges) and
    the bench's own CPU."""
    out = tmp_path / "bench.json"
    argv = [
        "--nodes", "4", "--workloads", "throughput", "--rounds", "1", "--batch", "8",
        "--clients", "2", "--window", "2", "--max-messages", "300",
        "--throughput-seconds", "30", "--seed", "7", "--dir", str(tmp_path / "work"),
        "--json", str(out),
    ]  # fmt: skip
    r = run_main("gossip.bench.cluster", argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 clients x 2 calls of 8 msgs in flight" in r.stdout
    figures = json.loads(out.read_text())["runs"][0]["figures"]
    assert figures["messages"] == 300
    assert figures["undelivered_pairs"] == 0 and figures["submit_errors"] == 0
    assert figures["all_delivered"] is True
    assert 0 < figures["pushes_per_message"] * 300 < 300 * 4
    assert figures["cpu_us_per_message_per_node"] > 0
    assert figures["bench_cpu_share"] > 0


def test_client_path_bench_times_every_way_and_refuses_an_unknown_one() -> None:
    """``python -m gossip.bench.client_path`` stores every message each way (it raises
    otherwise) and prints one row per way with its cost over the core; an unknown way
    is one usage line, exit status 2."""
    r = run_main(
        "gossip.bench.client_path",
        ["--messages", "64", "--rounds", "1", "--ways", "core,submit,pipe16,many16"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["core", "submit", "pipe16", "many16"]
    assert all(float(row[1]) > 0 for row in rows)
    bad = run_main("gossip.bench.client_path", ["--ways", "core,sideways"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "python -m gossip.bench.client_path: error: --ways: unknown way 'sideways'"
        " (core, submit, pipeN, manyN) (see --help)"
    ]
