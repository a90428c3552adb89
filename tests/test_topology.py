"""Graph generation, generated cluster files, and the ``gossip-config`` command."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest

from gossip.config import load_config, parse_config
from gossip.topology import (
    diameter,
    generate_config,
    generate_graph,
    main,
    mean_shortest_path,
)

TOPOLOGY16_JSON = Path("/work/shared/topology16.json")


def assert_regular_connected(edges: list[tuple[int, int]], n: int, degree: int) -> None:
    """ids 1..n, no self-links or repeated edges, every degree equal, one component."""
    assert all(a < b for a, b in edges)
    assert len(set(edges)) == len(edges) == n * degree // 2
    degrees = Counter(x for edge in edges for x in edge)
    assert set(degrees) == set(range(1, n + 1))
    assert set(degrees.values()) == {degree}
    diameter(edges)  # raises ValueError when disconnected


def test_sixteen_nodes_is_the_known_optimal_graph() -> None:
    """n=16, degree 3 is the graph of topology16.json with ids shifted by +1."""
    edges = generate_graph(16)
    assert diameter(edges) == 3
    assert mean_shortest_path(edges) == pytest.approx(2.2)
    assert_regular_connected(edges, 16, 3)
    if not TOPOLOGY16_JSON.exists():
        pytest.skip(f"{TOPOLOGY16_JSON} is not here")
    data = json.loads(TOPOLOGY16_JSON.read_text())
    assert edges == sorted((a + 1, b + 1) for a, b in data["edges"])
    assert generate_graph(16, seed=5) == edges


def test_generate_config_16() -> None:
    """generate_config(16): ports base + i, neighbours from the optimal graph, diameter 3."""
    config = generate_config(16)
    assert list(config.nodes) == list(range(1, 17))
    spec = config.node(1)
    assert (spec.host, spec.peer_port, spec.client_port) == ("127.0.0.1", 17001, 17101)
    assert spec.neighbours == (7, 11, 15)
    assert config.edges() == generate_graph(16)
    assert diameter(config.edges()) == 3


@pytest.mark.parametrize("n", [4, 10, 18, 50, 200, 1000])
def test_generated_graphs_are_connected_regular_and_shallow(n: int) -> None:
    """Degree-3 graphs: connected, regular; for n <= 200 the diameter is near log2(n)."""
    start = time.monotonic()
    edges = generate_graph(n)
    assert time.monotonic() - start < 10
    assert_regular_connected(edges, n, 3)
    if n <= 200:
        assert diameter(edges) <= math.ceil(math.log2(n)) + 2
    else:
        assert diameter(edges) <= math.ceil(math.log2(n)) + 5


@pytest.mark.parametrize(("n", "expected"), [(4, 1), (10, 2), (18, 3), (50, 5)])
def test_small_graphs_reach_good_diameters(n: int, expected: int) -> None:
    """The search finds K4, the Petersen graph's diameter 2, and diameter 3 / 5 for 18 / 50."""
    assert diameter(generate_graph(n)) <= expected


@pytest.mark.parametrize(("n", "degree"), [(5, 2), (9, 4), (10, 5), (12, 7), (10, 9), (2, 1)])
def test_other_degrees(n: int, degree: int) -> None:
    """Rings, sparse, dense and complete graphs of other degrees are regular and connected."""
    assert_regular_connected(generate_graph(n, degree), n, degree)


@pytest.mark.parametrize(
    ("n", "degree", "match"),
    [
        (17, 3, r"n \* degree must be even"),
        (3, 3, "needs at least 4 nodes"),
        (6, 1, "degree 1 has exactly 2 nodes"),
        (4, -1, "degree must be >= 0"),
    ],
)
def test_impossible_graphs_raise_value_error(n: int, degree: int, match: str) -> None:
    """An odd n * degree, too few nodes or an impossible connected degree is a ValueError."""
    with pytest.raises(ValueError, match=match):
        generate_graph(n, degree)


def test_generation_is_deterministic_per_seed() -> None:
    """The same seed gives the same graph; another seed may give another."""
    assert generate_graph(30, seed=1) == generate_graph(30, seed=1)
    assert generate_graph(30, seed=1) != generate_graph(30, seed=2)


def test_diameter_and_mean_path_of_known_graphs() -> None:
    """BFS measures: a path of 4 nodes, and K4."""
    path = [(1, 2), (2, 3), (3, 4)]
    assert diameter(path) == 3
    assert mean_shortest_path(path) == pytest.approx((1 + 2 + 3 + 1 + 2 + 1) * 2 / 12)
    k4 = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert (diameter(k4), mean_shortest_path(k4)) == (1, 1.0)


def test_diameter_of_disconnected_graph_raises() -> None:
    """A disconnected graph has no diameter."""
    with pytest.raises(ValueError, match="not connected"):
        diameter([(1, 2), (3, 4)])


def test_large_cluster_ports_never_overlap() -> None:
    """Above 100 nodes the client ports start past the last peer port (a hundred rounded up)."""
    config = generate_config(150, base_peer_port=20000)
    peer = {spec.peer_port for spec in config.nodes.values()}
    client = {spec.client_port for spec in config.nodes.values()}
    assert max(peer) == 20150
    assert min(client) == 20201
    assert not peer & client


def test_ports_past_65535_are_a_value_error() -> None:
    """generate_config refuses port ranges that do not fit."""
    with pytest.raises(ValueError, match=r"do not fit in 1\.\.65535"):
        generate_config(100, base_peer_port=65400)


# -- gossip-config -------------------------------------------------------------


def test_main_writes_a_file_that_check_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--nodes -o writes a valid file and a summary; --check accepts the file."""
    out = tmp_path / "cluster.toml"
    argv = ["--nodes", "16", "--name", "t", "--base-port", "30000", "-o", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "16 nodes, degree 3, diameter 3, mean path 2.20\n"
    config = load_config(out)
    assert config.name == "t"
    assert config.node(16).peer_port == 30016
    assert config.node(16).client_port == 30116

    assert main(["--check", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}: ok: 16 nodes, degree 3, diameter 3, mean path 2.20\n"
    assert captured.err == ""


def test_main_writes_toml_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """Without -o the TOML goes to stdout, the summary to stderr."""
    assert main(["--nodes", "10", "--seed", "3", "--host", "10.1.2.3"]) == 0
    captured = capsys.readouterr()
    config = parse_config(captured.out)
    assert {spec.host for spec in config.nodes.values()} == {"10.1.2.3"}
    assert captured.err.startswith("10 nodes, degree 3, diameter ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--nodes", "x"],
        ["--nodes", "0"],
        ["--nodes", "17"],
        ["--nodes", "4", "--check", "f.toml"],
        ["--nodes", "4", "--base-port", "70000"],
        ["--nodes", "600", "--base-port", "65000"],
        ["--bogus"],
    ],
)
def test_main_bad_arguments_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments exit 2 with one error line on stderr, never a traceback."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gossip-config: error: ")
    assert captured.err.count("\n") == 1


def test_main_check_broken_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check on an invalid file prints the one-line ConfigError and exits 1."""
    path = tmp_path / "bad.toml"
    main(["--nodes", "4", "-o", str(path)])
    capsys.readouterr()
    path.write_text(path.read_text().replace("neighbours = [1, 3, 4]", "neighbors = [1, 3, 4]"))
    assert main(["--check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"{path}: node[2]: unknown key 'neighbors' (did you mean 'neighbours'?)\n"
    )


def test_main_check_missing_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check on a file that does not exist is one line and exit 1."""
    assert main(["--check", str(tmp_path / "none.toml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot read" in err


# -- hosts, ports and listen interfaces (gossip-config for several hosts) -------


def test_host_template_gives_each_node_its_host_and_the_same_ports() -> None:
    """{index} is id - 1 (a StatefulSet ordinal); with a host per node every node uses
    17001 and 17101, listens on every interface and is dialled at its host name."""
    config = generate_config(4, host="gossip-{index}.gossip.default.svc.cluster.local")
    spec = config.node(3)
    assert spec.host == "gossip-2.gossip.default.svc.cluster.local"
    assert (spec.peer_port, spec.client_port) == (17001, 17101)
    assert spec.peer_listen == "tcp:17001:interface=0.0.0.0"
    assert spec.client_listen == "tcp:17101:interface=0.0.0.0"
    assert spec.peer_address == "tcp:host=gossip-2.gossip.default.svc.cluster.local:port=17001"
    assert generate_config(4, host="n{id}").node(4).host == "n4"


def test_ip_literal_hosts_listen_on_themselves_unless_told() -> None:
    """A host that is an IP literal is its own listen interface; --listen-interface
    overrides it (an IPv6 interface listens with tcp6)."""
    spec = generate_config(4, host="10.0.0.{id}").node(2)
    assert spec.peer_listen == "tcp:17001:interface=10.0.0.2"
    spec = generate_config(4, host="10.0.0.{id}", listen_interface="::").node(2)
    assert spec.peer_listen == "tcp6:17001:interface=\\:\\:"
    assert spec.peer_address == "tcp:host=10.0.0.2:port=17001"


def test_main_host_template_options_write_a_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--host-template, --peer-port, --client-port, --listen-interface and --name end up
    in a file that --check accepts."""
    out = tmp_path / "k8s.toml"
    argv = [
        "--nodes", "16", "--name", "prod", "--host-template", "gossip-{index}.gossip",
        "--peer-port", "7000", "--client-port", "7100", "--listen-interface", "0.0.0.0",
        "-o", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    config = load_config(out)
    assert config.name == "prod"
    spec = config.node(16)
    assert spec.peer_address == "tcp:host=gossip-15.gossip:port=7000"
    assert spec.client_listen == "tcp:7100:interface=0.0.0.0"
    assert main(["--check", str(out)]) == 0
    assert "ok: 16 nodes" in capsys.readouterr().out


def test_main_loopback_keeps_per_node_ports(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a template every node is on 127.0.0.1 at 17000 + id and 17100 + id, and
    the file has no endpoint keys (they are derived)."""
    assert main(["--nodes", "4"]) == 0
    text = capsys.readouterr().out
    assert "_listen" not in text and "_address" not in text
    spec = parse_config(text).node(4)
    assert (spec.host, spec.peer_port, spec.client_port) == ("127.0.0.1", 17004, 17104)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--host-template", "gossip-{idx}"], "unknown placeholder {idx}"),
        (["--peer-port", "7000"], "--peer-port and --client-port need a --host-template"),
        (["--host-template", "n{id}", "--peer-port", "7", "--client-port", "7"], "both 7"),
        (["--host-template", "n{id}", "--peer-port", "0"], "must be 1..65535"),
    ],
)
def test_main_bad_host_options_exit_2_with_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad template or port option is one line naming the problem, exit status 2."""
    assert main(["--nodes", "4", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_main_settings_markdown_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    """--settings-markdown prints the generated configuration tables."""
    from gossip.settings import settings_markdown

    assert main(["--settings-markdown"]) == 0
    assert capsys.readouterr().out == settings_markdown() + "\n"
