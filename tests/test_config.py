"""The cluster file: parsing, defaults, one-line errors for every problem, dump round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossip.config import (
    ClusterConfig,
    ConfigError,
    NodeSpec,
    dump_config,
    format_ids,
    load_config,
    parse_config,
)

SRC = "cluster.toml"

CLUSTER = """\
[cluster]
name = "local"
"""


def node(i: int, nbs: list[int] | None, port: int | None = None, host: str = "127.0.0.1") -> str:
    port = 17000 + i if port is None else port
    text = f"""
[[node]]
id = {i}
host = "{host}"
peer_port = {port}
client_port = {port + 100}
"""
    if nbs is not None:
        text += f"neighbours = {nbs}\n"
    return text


# K4: every node has the other three as neighbours.
K4 = {1: [2, 3, 4], 2: [1, 3, 4], 3: [1, 2, 4], 4: [1, 2, 3]}


def k4(**changes: list[int] | None) -> str:
    """The K4 cluster file, with ``n<id>=[...]`` replacing a node's neighbours."""
    nbs = {i: changes.get(f"n{i}", K4[i]) for i in K4}
    return CLUSTER + "".join(node(i, nbs[i]) for i in K4)


def error(text: str) -> str:
    """The error for ``text``; checks it is one line that starts with the file name."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{SRC}: ")
    return message


def test_minimal_file_gets_documented_defaults() -> None:
    """Only cluster.name and the nodes are required; the rest default as documented."""
    config = parse_config(k4(), SRC)
    assert config.name == "local"
    assert config.max_message_bytes == 32768
    assert config.allow_any_degree is False
    assert config.dissemination == "plumtree"
    assert (config.reconnect_max_delay, config.ping_interval, config.idle_timeout) == (
        5.0,
        5.0,
        15.0,
    )
    assert config.source == SRC
    assert list(config.nodes) == [1, 2, 3, 4]
    assert config.node(2) == NodeSpec(2, "127.0.0.1", 17002, 17102, (1, 3, 4))


def test_neighbours_are_sorted() -> None:
    """NodeSpec.neighbours is sorted whatever the order in the file."""
    config = parse_config(k4(n1=[4, 2, 3]))
    assert config.node(1).neighbours == (2, 3, 4)


def test_all_cluster_keys_are_read() -> None:
    """Every [cluster] key is read; integer seconds are accepted as floats."""
    text = k4().replace(
        'name = "local"\n',
        'name = "x"\nmax_message_bytes = 60000\nallow_any_degree = true\n'
        'dissemination = "flood"\nreconnect_max_delay = 0.5\nping_interval = 2\n'
        "idle_timeout = 6.5\n",
    )
    config = parse_config(text)
    assert config.max_message_bytes == 60000
    assert config.allow_any_degree is True
    assert config.reconnect_max_delay == 0.5
    assert config.ping_interval == 2.0
    assert isinstance(config.ping_interval, float)
    assert config.idle_timeout == 6.5


def test_toml_syntax_error_names_line_and_column() -> None:
    """A TOML syntax error is reported with its line and column."""
    text = k4().replace("peer_port = 17002", "peer_port = ")
    line = text.splitlines().index("peer_port = ") + 1
    assert error(text) == f"{SRC}: line {line}, column 13: Invalid value"


def test_load_config_records_path_as_source(tmp_path: Path) -> None:
    """load_config reads a file and names it in later errors."""
    path = tmp_path / "c.toml"
    path.write_text(k4())
    config = load_config(path)
    assert config.source == str(path)
    with pytest.raises(ConfigError, match=rf"^{path}: node 9 is not in this cluster"):
        config.node(9)


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    """A file that cannot be read is a ConfigError naming it, not an OSError."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a ConfigError naming the file and the line."""
    path = tmp_path / "c.toml"
    path.write_bytes(b'[cluster]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: line 2: not UTF-8 text$"):
        load_config(path)


def test_config_error_is_always_one_line() -> None:
    """ConfigError flattens any newline in its text."""
    assert str(ConfigError("a\nb")) == "a b"


# -- unknown keys --------------------------------------------------------------


def test_unknown_node_key_suggests_the_right_one() -> None:
    """A misspelt node key is an error that names the node and suggests the key."""
    text = k4().replace("neighbours = [1, 3, 4]", "neighbors = [1, 3, 4]")
    assert error(text) == f"{SRC}: node[2]: unknown key 'neighbors' (did you mean 'neighbours'?)"


def test_unknown_cluster_key_suggests_the_right_one() -> None:
    """A misspelt [cluster] key is an error, not a silently ignored setting."""
    text = k4().replace('name = "local"', 'name = "local"\nping_intervall = 1.0')
    assert error(text) == (
        f"{SRC}: cluster: unknown key 'ping_intervall' (did you mean 'ping_interval'?)"
    )


def test_unknown_top_level_key() -> None:
    """A top-level [[nodes]] instead of [[node]] is an error suggesting 'node'."""
    text = k4().replace("[[node]]", "[[nodes]]")
    assert error(text) == f"{SRC}: unknown key 'nodes' (did you mean 'node'?)"


def test_unknown_key_without_close_match_lists_allowed_keys() -> None:
    """With nothing close, the error lists the keys that are allowed."""
    text = k4() + "[graph]\nzzz = 1\n"
    assert error(text) == f"{SRC}: graph: unknown key 'zzz' (allowed: edges)"


# -- [cluster] -----------------------------------------------------------------


def test_missing_cluster_table() -> None:
    """A file without [cluster] is an error saying so."""
    assert error(k4().replace(CLUSTER, "")) == f"{SRC}: missing [cluster] table"


def test_missing_cluster_name() -> None:
    """cluster.name has no default."""
    assert error(k4().replace('name = "local"', "")) == f"{SRC}: cluster: missing key 'name'"


def test_cluster_must_be_a_table() -> None:
    """A scalar where the [cluster] table belongs names the type found."""
    text = "cluster = 5\n" + "".join(node(i, K4[i]) for i in K4)
    assert error(text) == f"{SRC}: cluster: expected a table, got an integer (5)"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_message_bytes = 0", "cluster.max_message_bytes: 0 is out of range: must be 1..60000"),
        ("max_message_bytes = 60001", "cluster.max_message_bytes: 60001 is out of range"),
        ("max_message_bytes = true", "cluster.max_message_bytes: expected an integer, got a bool"),
        ("max_message_bytes = 1024.0", "cluster.max_message_bytes: expected an integer, got a flo"),
        ("allow_any_degree = 1", "cluster.allow_any_degree: expected true or false, got an int"),
        ('dissemination = "push"', "cluster.dissemination: unknown strategy 'push' (allowed: pl"),
        ("dissemination = 1", "cluster.dissemination: expected a string, got an integer (1)"),
        ("reconnect_max_delay = 0", "cluster.reconnect_max_delay: must be a positive number of"),
        ("ping_interval = -1.0", "cluster.ping_interval: must be a positive number of seconds"),
        ("ping_interval = inf", "cluster.ping_interval: must be a positive number of seconds"),
        ("ping_interval = true", "cluster.ping_interval: expected a number of seconds, got a b"),
        ('idle_timeout = "15"', "cluster.idle_timeout: expected a number of seconds, got a str"),
        ('name = ""', "cluster.name: must not be empty"),
    ],
)
def test_bad_cluster_value_names_the_field(line: str, expected: str) -> None:
    """Each [cluster] value out of range or of the wrong type names its field."""
    key = line.split(" ")[0]
    text = k4().replace('name = "local"\n', "" if key == "name" else 'name = "local"\n')
    text = text.replace("[cluster]\n", f"[cluster]\n{line}\n")
    assert error(text).startswith(f"{SRC}: {expected}")


def test_idle_timeout_must_exceed_ping_interval() -> None:
    """idle_timeout <= ping_interval would drop every idle link; it is an error."""
    text = k4().replace('name = "local"', 'name = "local"\nping_interval = 5\nidle_timeout = 5.0')
    assert error(text) == (
        f"{SRC}: cluster.idle_timeout: 5 must be greater than cluster.ping_interval (5)"
    )


# -- [[node]] ------------------------------------------------------------------


def test_empty_cluster() -> None:
    """A file without any [[node]] is an error."""
    assert error(CLUSTER) == f"{SRC}: no [[node]] tables: a cluster needs at least one node"


def test_node_must_be_an_array_of_tables() -> None:
    """[node] (one table) instead of [[node]] is an error naming what was found."""
    text = CLUSTER + node(1, []).replace("[[node]]", "[node]")
    assert error(text) == f"{SRC}: node: expected [[node]] tables, got a table"


@pytest.mark.parametrize("key", ["id", "host", "peer_port", "client_port"])
def test_missing_node_key(key: str) -> None:
    """Every node needs id, host and both ports."""
    lines = k4().splitlines(keepends=True)
    third = [i for i, line in enumerate(lines) if line == "[[node]]\n"][2]
    drop = next(i for i in range(third, len(lines)) if lines[i].startswith(f"{key} ="))
    text = "".join(lines[:drop] + lines[drop + 1 :])
    assert error(text) == f"{SRC}: node[3]: missing key '{key}'"


def test_missing_neighbours_without_edges() -> None:
    """Without [graph].edges every node needs a neighbours list."""
    text = CLUSTER + node(1, [2]) + node(2, None)
    assert error(text) == f"{SRC}: node[2]: missing key 'neighbours' (or give [graph].edges)"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("id = 3", "id = true", "node[3].id: expected an integer, got a boolean (true)"),
        ("id = 3", 'id = "3"', 'node[3].id: expected an integer, got a string ("3")'),
        ("id = 3", "id = -1", "node[3].id: -1 is out of range: must be 0..2147483647"),
        ("id = 3", "id = 2147483648", "node[3].id: 2147483648 is out of range"),
        (
            "peer_port = 17003",
            "peer_port = true",
            "node[3].peer_port: expected an integer, got a b",
        ),
        ("peer_port = 17003", "peer_port = 0", "node[3].peer_port: 0 is out of range: must be 1.."),
        ("client_port = 17103", "client_port = 65536", "node[3].client_port: 65536 is out of r"),
        ('host = "127.0.0.1"\npeer_port = 17003', 'host = ""\npeer_port = 17003', "node[3].host: "),
        ('host = "127.0.0.1"\npeer_port = 17003', "host = 1\npeer_port = 17003", "node[3].host: "),
        ("neighbours = [1, 2, 4]", "neighbours = 4", "node[3].neighbours: expected an array"),
        (
            "neighbours = [1, 2, 4]",
            "neighbours = [1, 2, true]",
            "node[3].neighbours: expected node",
        ),
    ],
)
def test_bad_node_value_names_the_field(old: str, new: str, expected: str) -> None:
    """Wrong types (a boolean is not an integer) and ranges name node[k].<field>."""
    text = k4()
    assert old in text
    assert error(text.replace(old, new)).startswith(f"{SRC}: {expected}")


def test_empty_host_is_an_error() -> None:
    """host must be a non-empty string."""
    text = k4().replace('host = "127.0.0.1"\npeer_port = 17002', 'host = " "\npeer_port = 17002')
    assert error(text) == f"{SRC}: node[2].host: must not be empty"


def test_duplicate_node_id() -> None:
    """Two nodes with one id: the second names the first."""
    text = k4().replace("id = 3", "id = 2")
    assert error(text) == f"{SRC}: node[3].id: id 2 is already used by node[2]"


def test_duplicate_peer_port() -> None:
    """A (host, port) used twice names both fields."""
    text = k4().replace("peer_port = 17003", "peer_port = 17001")
    assert (
        error(text) == f"{SRC}: node[3].peer_port: port 17001 is already used by node[1].peer_port"
    )


def test_client_port_may_not_reuse_a_peer_port() -> None:
    """Peer and client ports share one space per host, within a node too."""
    text = k4().replace("client_port = 17102", "client_port = 17002")
    assert error(text) == (
        f"{SRC}: node[2].client_port: port 17002 is already used by node[2].peer_port"
    )


def test_same_port_on_different_hosts_is_fine() -> None:
    """Port uniqueness is per host."""
    text = CLUSTER + "".join(node(i, K4[i], port=17000, host=f"10.0.0.{i}") for i in K4)
    config = parse_config(text)
    assert {spec.peer_port for spec in config.nodes.values()} == {17000}


# -- neighbours ----------------------------------------------------------------


def test_neighbour_that_is_not_a_node() -> None:
    """A neighbour id must be a node of the cluster; the error lists the ids."""
    assert error(k4(n2=[1, 3, 9])) == f"{SRC}: node[2].neighbours: 9 is not a node id (ids: 1-4)"


def test_self_link() -> None:
    """A node may not list itself."""
    assert error(k4(n2=[1, 2, 4])) == (
        f"{SRC}: node[2].neighbours: node 2 lists itself as a neighbour"
    )


def test_duplicate_neighbour_entry() -> None:
    """A neighbour listed twice is an error, not silently merged."""
    assert error(k4(n2=[1, 3, 3])) == f"{SRC}: node[2].neighbours: 3 is listed twice"


def test_asymmetric_neighbours() -> None:
    """If node a lists b, b must list a; the error names the lister and both ids."""
    text = (
        CLUSTER + "".join(node(i, K4[i]) for i in (1, 2, 3)) + node(5, [1, 2])
    )  # node 5 lists 1 and 2; they do not list it
    text = text.replace("neighbours = [2, 3, 4]", "neighbours = [2, 3]")
    text = text.replace("neighbours = [1, 3, 4]", "neighbours = [1, 3]")
    text = text.replace("neighbours = [1, 2, 4]", "neighbours = [1, 2]")
    assert error(text) == (
        f"{SRC}: node[4].neighbours: node[4] (id 5) lists 1 as a neighbour"
        " but node 1 does not list 5"
    )


def test_degree_must_be_three() -> None:
    """Without allow_any_degree every node has exactly 3 neighbours."""
    ring = {1: [2, 4], 2: [1, 3], 3: [2, 4], 4: [1, 3]}
    text = CLUSTER + "".join(node(i, ring[i]) for i in ring)
    assert error(text) == (
        f"{SRC}: node[1].neighbours: node 1 has 2 neighbours; every node needs exactly 3"
        " unless cluster.allow_any_degree = true"
    )


def test_allow_any_degree_accepts_a_ring() -> None:
    """allow_any_degree = true lifts the degree rule (connectivity still holds)."""
    ring = {1: [2, 4], 2: [1, 3], 3: [2, 4], 4: [1, 3]}
    text = CLUSTER + "allow_any_degree = true\n" + "".join(node(i, ring[i]) for i in ring)
    assert parse_config(text).node(3).neighbours == (2, 4)


def test_single_node_cluster_with_any_degree() -> None:
    """One node and no links is a valid (trivially connected) cluster."""
    text = CLUSTER + "allow_any_degree = true\n" + node(7, [])
    assert parse_config(text).node(7).neighbours == ()


def test_disconnected_graph_names_an_unreachable_node() -> None:
    """Two separate K4s: every degree is 3 but node 5 cannot be reached from node 1."""
    second = {i + 4: [n + 4 for n in nbs] for i, nbs in K4.items()}
    text = k4() + "".join(node(i, nbs) for i, nbs in second.items())
    assert error(text) == (
        f"{SRC}: the graph is not connected: node 5 (node[5]) cannot be reached from node 1"
        " (4 of 8 nodes unreachable)"
    )


# -- [graph].edges -------------------------------------------------------------


K4_EDGES = "[graph]\nedges = [[1, 2], [1, 3], [1, 4], [2, 3], [2, 4], [3, 4]]\n"


def k4_edges() -> str:
    return CLUSTER + "".join(node(i, None) for i in K4) + K4_EDGES


def test_edges_give_the_neighbours() -> None:
    """[graph].edges is an alternative to per-node neighbours lists."""
    assert parse_config(k4_edges()) == parse_config(k4())


def test_edges_and_neighbours_together_is_an_error() -> None:
    """Links come from one place: per-node lists or [graph].edges, never both."""
    text = CLUSTER + node(1, [2, 3, 4]) + "".join(node(i, None) for i in (2, 3, 4)) + K4_EDGES
    assert error(text) == (
        f"{SRC}: node[1].neighbours: neighbours are given both here and in [graph].edges; use one"
    )


def test_edge_given_twice() -> None:
    """An edge listed twice (in either direction) names both places."""
    text = k4_edges().replace("[3, 4]]", "[3, 4], [2, 1]]")
    assert error(text) == f"{SRC}: graph.edges[7]: edge [2, 1] is given twice (also graph.edges[1])"


@pytest.mark.parametrize(
    ("edge", "expected"),
    [
        ("[3, 9]", "graph.edges[6]: 9 is not a node id (ids: 1-4)"),
        ("[4, 4]", "graph.edges[6]: [4, 4] links node 4 to itself"),
        ("[3, 4, 1]", "graph.edges[6]: expected a pair of node ids like [1, 2], got an array"),
        ('[3, "4"]', "graph.edges[6]: expected a pair of node ids like [1, 2]"),
    ],
)
def test_bad_edge_names_its_index(edge: str, expected: str) -> None:
    """A malformed edge, an unknown node or a self-link names graph.edges[k]."""
    text = k4_edges().replace("[3, 4]]", f"{edge}]")
    assert error(text).startswith(f"{SRC}: {expected}")


def test_graph_without_edges() -> None:
    """An empty [graph] table is an error, not an empty graph."""
    text = CLUSTER + "".join(node(i, None) for i in K4) + "[graph]\n"
    assert error(text) == f"{SRC}: graph: missing key 'edges'"


def test_degree_error_with_edges_names_graph_edges() -> None:
    """With an edge list, a wrong degree says the count comes from graph.edges."""
    text = k4_edges().replace(", [3, 4]]", "]")
    assert error(text) == (
        f"{SRC}: node[3]: node 3 has 2 neighbours in graph.edges; every node needs exactly 3"
        " unless cluster.allow_any_degree = true"
    )


# -- ClusterConfig ---------------------------------------------------------------


def test_node_lookup_error_compresses_ids() -> None:
    """ClusterConfig.node names the source and the ids it has, runs compressed."""
    config = parse_config(k4(), SRC)
    with pytest.raises(ConfigError) as info:
        config.node(99)
    assert str(info.value) == f"{SRC}: node 99 is not in this cluster (ids: 1-4)"


def test_format_ids() -> None:
    """Runs of three or more consecutive ids are written as ranges."""
    assert format_ids([7, 5, 6, 1, 3, 9, 10]) == "1, 3, 5-7, 9, 10"
    assert format_ids(range(1, 17)) == "1-16"
    assert format_ids([]) == "none"


def test_edges_lists_each_link_once() -> None:
    """ClusterConfig.edges returns every link once as (low, high)."""
    assert parse_config(k4()).edges() == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]


def test_config_is_hashable_and_source_is_not_compared() -> None:
    """A config can be hashed (the nodes dict is left out) and equality ignores source."""
    a = parse_config(k4(), "a.toml")
    b = parse_config(k4(), "b.toml")
    assert a == b
    assert hash(a) == hash(b)
    assert a != parse_config(k4(n1=[3, 2, 4]).replace('"local"', '"other"'))


def test_dump_parse_round_trip() -> None:
    """dump_config writes TOML that parse_config reads back equal, odd strings included."""
    nodes = {
        i: NodeSpec(i, host, 20000 + i, 21000 + i, tuple(K4[i]))
        for i, host in zip(K4, ['h"1', "h\\2", "h\n3\t\x7f", "höst-4"], strict=True)
    }
    config = ClusterConfig(
        name='we "quote" \\ and ✓ 🎉',
        nodes=nodes,
        max_message_bytes=1000,
        allow_any_degree=True,
        dissemination="flood",
        reconnect_max_delay=0.1,
        ping_interval=1e-05,
        idle_timeout=1e16,
    )
    text = dump_config(config)
    assert parse_config(text) == config
    assert "neighbours = [1, 3, 4]" in text


def test_dump_of_parsed_file_round_trips() -> None:
    """A file parsed, dumped and parsed again is the same config."""
    config = parse_config(k4_edges(), SRC)
    again = parse_config(dump_config(config))
    assert again == config
    assert again.source == "<string>"


# -- endpoint descriptions (peer_listen, peer_address, client_listen, client_address) --


def two_nodes(one: str, two: str = 'host = "b"\npeer_port = 1\nclient_port = 2\n') -> str:
    """A two-node cluster (any degree) whose nodes' keys besides id and neighbours are given."""
    return (
        CLUSTER
        + "allow_any_degree = true\n"
        + f"\n[[node]]\nid = 1\n{one}neighbours = [2]\n"
        + f"\n[[node]]\nid = 2\n{two}neighbours = [1]\n"
    )


def test_endpoints_are_derived_from_host_and_ports() -> None:
    """Without endpoint keys a node listens on its host's interface and is dialled at its host."""
    spec = parse_config(k4()).node(2)
    assert spec.peer_listen == "tcp:17002:interface=127.0.0.1"
    assert spec.peer_address == "tcp:host=127.0.0.1:port=17002"
    assert spec.client_listen == "tcp:17102:interface=127.0.0.1"
    assert spec.client_address == "tcp:host=127.0.0.1:port=17102"


def test_ipv6_host_derives_tcp6_listen_and_escaped_address() -> None:
    """An IPv6 literal host listens with tcp6; its colons are escaped as Twisted's
    quoteStringArgument escapes them, and Twisted's parser reads the host back."""
    from twisted.internet.endpoints import _parse, quoteStringArgument

    text = two_nodes('host = "::1"\npeer_port = 17001\nclient_port = 17101\n')
    spec = parse_config(text).node(1)
    assert spec.peer_listen == f"tcp6:17001:interface={quoteStringArgument('::1')}"
    assert spec.peer_listen == "tcp6:17001:interface=\\:\\:1"
    assert _parse(spec.peer_address) == (["tcp"], {"host": "::1", "port": "17001"})


def test_explicit_endpoints_need_no_host_or_ports() -> None:
    """A node that gives all four descriptions needs neither host nor ports; the
    descriptions are kept as written and survive a dump and parse."""
    one = (
        'peer_listen = "tcp:17001:interface=0.0.0.0"\n'
        'peer_address = "tcp:host=gossip-0.gossip:port=17001"\n'
        'client_listen = "tcp6:17101:interface=\\\\:\\\\:"\n'
        'client_address = "tcp:host=gossip-0.gossip:port=17101"\n'
    )
    config = parse_config(two_nodes(one))
    spec = config.node(1)
    assert (spec.host, spec.peer_port, spec.client_port) == (None, None, None)
    assert spec.client_listen == "tcp6:17101:interface=\\:\\:"
    assert spec.peer_address == "tcp:host=gossip-0.gossip:port=17001"
    assert parse_config(dump_config(config)) == config


def test_dump_writes_only_endpoints_that_differ_from_the_derived_ones() -> None:
    """dump_config leaves out an endpoint that host and port would give anyway."""
    text = two_nodes('host = "a"\npeer_port = 1\nclient_port = 2\npeer_listen = "tcp:1"\n')
    dumped = dump_config(parse_config(text))
    assert 'peer_listen = "tcp:1"' in dumped
    assert "peer_address" not in dumped
    assert "client_listen" not in dumped


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            'peer_listen = "tcp:abc"\n',
            "node[1].peer_listen: not a server endpoint description ('tcp:abc'): invalid literal",
        ),
        (
            'peer_listen = "bogus:1"\n',
            "node[1].peer_listen: not a server endpoint description ('bogus:1'): Unknown endpoint",
        ),
        (
            'peer_address = "tcp:host=a:port=1:colour=red"\n',
            "node[1].peer_address: not a client endpoint description",
        ),
        ('client_address = "tcp:host=a"\n', "node[1].client_address: not a client endpoint"),
        (
            'peer_listen = "tcp:70000"\n',
            "node[1].peer_listen: port '70000' in 'tcp:70000' is out of range: must be 1..65535",
        ),
        ('client_listen = ""\n', "node[1].client_listen: must not be empty"),
        ("peer_address = 5\n", "node[1].peer_address: expected a string, got an integer (5)"),
    ],
)
def test_bad_endpoint_description_names_the_field(keys: str, expected: str) -> None:
    """A description Twisted's parser refuses is one line naming node[k].<key> and why."""
    text = two_nodes('host = "a"\npeer_port = 1\nclient_port = 2\n' + keys)
    assert error(text).startswith(f"{SRC}: {expected}")


def test_two_listens_on_one_port_of_a_host_are_an_error() -> None:
    """Two listen descriptions on one port of one machine clash, a wildcard interface
    included; the error names both fields."""
    keys = 'client_listen = "tcp:1:interface=0.0.0.0"\n'
    text = two_nodes('host = "a"\npeer_port = 1\nclient_port = 2\n' + keys)
    assert error(text) == (
        f"{SRC}: node[1].client_listen: 'tcp:1:interface=0.0.0.0' listens on port 1"
        " like node[1].peer_listen on host 'a'"
    )


def test_same_listen_on_different_hosts_is_fine() -> None:
    """Every pod of a StatefulSet listens on tcp:17001:interface=0.0.0.0: one per host."""
    listen = 'peer_listen = "tcp:17001:interface=0.0.0.0"\n'
    text = two_nodes(
        'host = "a"\npeer_port = 17001\nclient_port = 17101\n' + listen,
        'host = "b"\npeer_port = 17001\nclient_port = 17101\n' + listen,
    )
    assert parse_config(text).node(2).peer_listen == "tcp:17001:interface=0.0.0.0"


def test_two_nodes_with_one_address_are_an_error() -> None:
    """Dialling one address cannot reach two nodes."""
    text = two_nodes('host = "a"\npeer_port = 1\nclient_port = 2\npeer_address = "tcp:b:1"\n')
    text = text.replace(
        'host = "b"\npeer_port = 1', 'peer_address = "tcp:b:1"\nhost = "b"\npeer_port = 9'
    )
    assert error(text) == (
        f"{SRC}: node[2].peer_address: 'tcp:b:1' is already used by node[1].peer_address"
    )


def test_missing_shorthand_names_what_it_would_derive() -> None:
    """With some endpoint keys given, a missing host or port says which endpoint needs it."""
    keys = 'peer_listen = "tcp:5"\npeer_address = "tcp:host=a:port=5"\nclient_port = 2\n'
    assert error(two_nodes(keys)) == (
        f"{SRC}: node[1]: missing key 'host' (needed to derive client_listen and client_address)"
    )


# -- the settings table ----------------------------------------------------------


def test_cluster_config_defaults_are_the_settings_table() -> None:
    """Every [cluster] default of a parsed file and of ClusterConfig is the table's."""
    from gossip import settings

    config = parse_config(k4())
    bare = ClusterConfig(name="x", nodes={})
    for s in settings.CLUSTER_SETTINGS:
        if not s.required:
            assert getattr(config, s.name) == s.default, s.name
            assert getattr(bare, s.name) == s.default, s.name


def test_every_cluster_key_is_a_setting_and_dumped() -> None:
    """The allowed [cluster] keys are the table's names, and dump_config writes each
    (an optional file that is not set, as client_token_file by default, is left out)."""
    from gossip import settings

    dumped = dump_config(parse_config(k4()))
    for s in settings.CLUSTER_SETTINGS:
        if s.kind == settings.PATH and s.default == "":
            assert f"\n{s.name} = " not in dumped
        else:
            assert f"\n{s.name} = " in dumped
    with_token = parse_config(k4().replace("[cluster]", '[cluster]\nclient_token_file = "t"'))
    assert '\nclient_token_file = "t"' in dump_config(with_token)
    assert parse_config(dump_config(with_token)) == with_token


def test_readme_configuration_reference_is_the_generated_one() -> None:
    """The README's settings tables are exactly what `gossip-config --settings-markdown`
    prints; regenerate them with that command when a setting changes."""
    from gossip.settings import settings_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    begin, end = "<!-- settings: begin -->\n", "\n<!-- settings: end -->"
    assert begin in readme and end in readme, "README lacks the settings markers"
    current = readme.split(begin, 1)[1].split(end, 1)[0]
    assert current.strip() == settings_markdown().strip(), (
        "README's configuration reference is stale: run gossip-config --settings-markdown"
    )
