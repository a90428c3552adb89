"""The cluster file: one TOML file that every node and tool of a cluster reads.

Format::

    [cluster]
    name = "local"                 # required; checked in the peer handshake
    max_message_bytes = 32768      # default 32768; 1..60000 (AMP values are limited to 64 KiB)
    allow_any_degree = false       # default false: every node has exactly 3 neighbours
    dissemination = "plumtree"     # default "plumtree"; or "flood" (the seed's rule)
    reconnect_max_delay = 5.0      # seconds, default 5.0, > 0
    ping_interval = 5.0            # seconds, default 5.0, > 0
    idle_timeout = 15.0            # seconds, default 15.0, > ping_interval
    sync_interval = 10.0           # seconds between anti-entropy sessions, default 10.0, > 0
    sync_timeout = 30.0            # seconds a re-sync session may stall, default 30.0, > 0
    fsync = "batch"                # "always", "batch" (group commit, default) or "never"

    [[node]]                       # one table per node, at least one
    id = 1                         # integer, 0 <= id < 2**31, unique
    host = "127.0.0.1"             # non-empty string
    peer_port = 17001              # 1..65535
    client_port = 17101            # 1..65535; no (host, port) is used twice
    neighbours = [2, 5, 9]         # node ids; required unless [graph].edges is given

    [graph]                        # optional: the links as an edge list instead
    edges = [[1, 2], [1, 5]]       # of per-node neighbours lists (never both)

The links form an undirected graph: a neighbours list must be symmetric (if 1
lists 2 then 2 lists 1), without duplicates or self-links, and the graph must
be connected. Unless ``allow_any_degree = true``, every node has exactly
``DEGREE`` (3) neighbours.

Every problem is a ``ConfigError`` whose text is one line naming the file and
the line (TOML syntax) or the field at fault, e.g.
``cluster.toml: node[3].peer_port: port 17001 is already used by node[1].peer_port``.
``node[k]`` is the k-th ``[[node]]`` table of the file, counting from 1, and
``graph.edges[k]`` the k-th edge; a bare "node 7" is the node whose id is 7.
Unknown keys are errors, so that a typo cannot pass silently.
"""

from __future__ import annotations

import datetime
import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import NoReturn

import attrs

DEGREE = 3
DEFAULT_MAX_MESSAGE_BYTES = 32768
MAX_MESSAGE_BYTES_LIMIT = 60000  # AMP values are limited to 64 KiB, with room for framing
DISSEMINATIONS = ("plumtree", "flood")
FSYNC_POLICIES = ("always", "batch", "never")
MAX_NODE_ID = 2**31 - 1

_TOP_KEYS = ("cluster", "node", "graph")
_CLUSTER_KEYS = (
    "name",
    "max_message_bytes",
    "allow_any_degree",
    "dissemination",
    "reconnect_max_delay",
    "ping_interval",
    "idle_timeout",
    "sync_interval",
    "sync_timeout",
    "fsync",
)
_NODE_KEYS = ("id", "host", "peer_port", "client_port", "neighbours")
_GRAPH_KEYS = ("edges",)


class ConfigError(Exception):
    """The cluster file cannot be used; ``str()`` is one line that says where and why."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


@attrs.frozen
class NodeSpec:
    id: int
    host: str
    peer_port: int
    client_port: int
    neighbours: tuple[int, ...]  # sorted


@attrs.frozen
class ClusterConfig:
    name: str
    # Keyed by node id, in file order. Left out of the hash (a dict has none);
    # equality still compares it.
    nodes: dict[int, NodeSpec] = attrs.field(hash=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    allow_any_degree: bool = False
    dissemination: str = "plumtree"
    reconnect_max_delay: float = 5.0
    ping_interval: float = 5.0
    idle_timeout: float = 15.0
    sync_interval: float = 10.0
    sync_timeout: float = 30.0
    fsync: str = "batch"
    # Where the config came from (a path or "<string>"); not part of equality.
    source: str = attrs.field(default="<string>", eq=False)

    def node(self, node_id: int) -> NodeSpec:
        spec = self.nodes.get(node_id)
        if spec is None:
            raise ConfigError(
                f"{self.source}: node {node_id} is not in this cluster "
                f"(ids: {format_ids(self.nodes)})"
            )
        return spec

    def edges(self) -> list[tuple[int, int]]:
        """Every link once, as sorted (low id, high id) pairs."""
        return sorted(
            (spec.id, nb) for spec in self.nodes.values() for nb in spec.neighbours if spec.id < nb
        )


def format_ids(ids: Iterable[int]) -> str:
    """Sorted ids with runs compressed: ``1, 3, 5-7``."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if len(run) >= 3:
            out.append(f"{run[0]}-{run[-1]}")
        else:
            out.extend(str(i) for i in run)

    for i in sorted(set(ids)):
        if run and i != run[-1] + 1:
            flush()
            run = []
        run.append(i)
    flush()
    return ", ".join(out) if out else "none"


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{source}: line {line}: not UTF-8 text") from None
    return parse_config(text, source)


_TOML_POSITION = re.compile(
    r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$"
)


def parse_config(text: str, source: str = "<string>") -> ClusterConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {_toml_error_text(e)}") from None
    return config_from_dict(data, source)


def _toml_error_text(e: tomllib.TOMLDecodeError) -> str:
    # Python 3.14 has e.msg/e.lineno/e.colno; before that only the text has them.
    lineno = getattr(e, "lineno", None)
    colno = getattr(e, "colno", None)
    msg = getattr(e, "msg", None)
    if isinstance(lineno, int) and isinstance(colno, int) and isinstance(msg, str):
        return f"line {lineno}, column {colno}: {msg}"
    m = _TOML_POSITION.match(str(e))
    if m is None:
        return str(e)
    if m["line"] is None:
        return f"end of file: {m['msg']}"
    return f"line {m['line']}, column {m['col']}: {m['msg']}"


def config_from_dict(data: Mapping[str, object], source: str = "<string>") -> ClusterConfig:
    """Validate parsed TOML (or an equivalent dict) and build the config."""
    return _Checker(source).build(data)


def dump_config(config: ClusterConfig) -> str:
    """TOML text for ``config``, with per-node neighbours lists."""
    lines = [
        f"# gossip cluster {config.name!r}: {len(config.nodes)} nodes",
        "[cluster]",
        f"name = {_toml_str(config.name)}",
        f"max_message_bytes = {config.max_message_bytes}",
        f"allow_any_degree = {'true' if config.allow_any_degree else 'false'}",
        f"dissemination = {_toml_str(config.dissemination)}",
        f"reconnect_max_delay = {_toml_float(config.reconnect_max_delay)}",
        f"ping_interval = {_toml_float(config.ping_interval)}",
        f"idle_timeout = {_toml_float(config.idle_timeout)}",
        f"sync_interval = {_toml_float(config.sync_interval)}",
        f"sync_timeout = {_toml_float(config.sync_timeout)}",
        f"fsync = {_toml_str(config.fsync)}",
    ]
    for spec in config.nodes.values():
        lines += [
            "",
            "[[node]]",
            f"id = {spec.id}",
            f"host = {_toml_str(spec.host)}",
            f"peer_port = {spec.peer_port}",
            f"client_port = {spec.client_port}",
            f"neighbours = [{', '.join(str(nb) for nb in spec.neighbours)}]",
        ]
    return "\n".join(lines) + "\n"


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(s: str) -> str:
    out = []
    for c in s:
        if c in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_float(x: float) -> str:
    return repr(float(x))  # repr round-trips; "1e-05" and "1e+16" are valid TOML


def _describe(value: object) -> str:
    """The TOML type of ``value`` with a short rendering, for error texts."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a float"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        kind = "an array"
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, datetime.date | datetime.time):
        kind = "a date/time"
    else:
        kind = type(value).__name__
    shown = _show(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind} ({shown})"


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Validates the parsed file; stops at the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str | None, problem: str) -> NoReturn:
        if where:
            raise ConfigError(f"{self.source}: {where}: {problem}")
        raise ConfigError(f"{self.source}: {problem}")

    def check_keys(self, table: Mapping[str, object], allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)
            self.fail(where or None, f"unknown key {key!r} ({hint})")

    def table(self, value: object, where: str) -> Mapping[str, object]:
        if not isinstance(value, dict):
            self.fail(where, f"expected a table, got {_describe(value)}")
        return value

    def get_int(
        self,
        table: Mapping[str, object],
        key: str,
        where: str,
        lo: int,
        hi: int,
        default: int | None = None,
        why: str = "",
    ) -> int:
        if key not in table:
            if default is None:
                self.fail(where, f"missing key {key!r}")
            return default
        value = table[key]
        field = f"{where}.{key}"
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, f"expected an integer, got {_describe(value)}")
        if not lo <= value <= hi:
            self.fail(field, f"{value} is out of range: must be {lo}..{hi}{why}")
        return value

    def get_str(
        self, table: Mapping[str, object], key: str, where: str, default: str | None = None
    ) -> str:
        if key not in table:
            if default is None:
                self.fail(where, f"missing key {key!r}")
            return default
        value = table[key]
        field = f"{where}.{key}"
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {_describe(value)}")
        if not value.strip():
            self.fail(field, "must not be empty")
        return value

    def get_bool(self, table: Mapping[str, object], key: str, where: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{where}.{key}", f"expected true or false, got {_describe(value)}")
        return value

    def get_seconds(
        self, table: Mapping[str, object], key: str, where: str, default: float
    ) -> float:
        value = table.get(key, default)
        field = f"{where}.{key}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(field, f"expected a number of seconds, got {_describe(value)}")
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(field, f"must be a positive number of seconds, got {_show(value)}")
        return seconds

    # -- the file --------------------------------------------------------

    def build(self, data: Mapping[str, object]) -> ClusterConfig:
        self.check_keys(data, _TOP_KEYS, "")
        if "cluster" not in data:
            self.fail(None, "missing [cluster] table")
        cluster = self.table(data["cluster"], "cluster")
        self.check_keys(cluster, _CLUSTER_KEYS, "cluster")
        name = self.get_str(cluster, "name", "cluster")
        max_bytes = self.get_int(
            cluster,
            "max_message_bytes",
            "cluster",
            1,
            MAX_MESSAGE_BYTES_LIMIT,
            DEFAULT_MAX_MESSAGE_BYTES,
            " (AMP values are limited to 64 KiB)",
        )
        any_degree = self.get_bool(cluster, "allow_any_degree", "cluster", False)
        dissemination = self.get_str(cluster, "dissemination", "cluster", "plumtree")
        if dissemination not in DISSEMINATIONS:
            self.fail(
                "cluster.dissemination",
                f"unknown strategy {dissemination!r} (allowed: {', '.join(DISSEMINATIONS)})",
            )
        reconnect = self.get_seconds(cluster, "reconnect_max_delay", "cluster", 5.0)
        ping = self.get_seconds(cluster, "ping_interval", "cluster", 5.0)
        idle = self.get_seconds(cluster, "idle_timeout", "cluster", 15.0)
        if idle <= ping:
            self.fail(
                "cluster.idle_timeout",
                f"{idle:g} must be greater than cluster.ping_interval ({ping:g})",
            )

        sync_interval = self.get_seconds(cluster, "sync_interval", "cluster", 10.0)
        sync_timeout = self.get_seconds(cluster, "sync_timeout", "cluster", 30.0)
        fsync = self.get_str(cluster, "fsync", "cluster", "batch")
        if fsync not in FSYNC_POLICIES:
            self.fail(
                "cluster.fsync",
                f"unknown fsync policy {fsync!r} (allowed: {', '.join(FSYNC_POLICIES)})",
            )

        raw_nodes = data.get("node", [])
        if not isinstance(raw_nodes, list):
            self.fail("node", f"expected [[node]] tables, got {_describe(raw_nodes)}")
        if not raw_nodes:
            self.fail(None, "no [[node]] tables: a cluster needs at least one node")
        tables = [self.table(t, f"node[{k}]") for k, t in enumerate(raw_nodes, 1)]
        nodes = self.node_fields(tables)

        if "graph" in data:
            graph = self.table(data["graph"], "graph")
            self.check_keys(graph, _GRAPH_KEYS, "graph")
            if "edges" not in graph:
                self.fail("graph", "missing key 'edges'")
            for k, t in enumerate(tables, 1):
                if "neighbours" in t:
                    self.fail(
                        f"node[{k}].neighbours",
                        "neighbours are given both here and in [graph].edges; use one",
                    )
            adj = self.edge_list(graph["edges"], nodes)
            links = "graph.edges"
        else:
            adj = self.neighbour_lists(tables, nodes)
            links = ""

        index = {node_id: k for k, node_id in enumerate(nodes, 1)}
        if not any_degree:
            for node_id, nbs in adj.items():
                if len(nbs) != DEGREE:
                    where = f"node[{index[node_id]}]" + ("" if links else ".neighbours")
                    self.fail(
                        where,
                        f"node {node_id} has {len(nbs)} neighbours"
                        + (f" in {links}" if links else "")
                        + f"; every node needs exactly {DEGREE}"
                        " unless cluster.allow_any_degree = true",
                    )
        first = next(iter(nodes))
        seen = {first}
        todo = [first]
        while todo:
            for nb in adj[todo.pop()]:
                if nb not in seen:
                    seen.add(nb)
                    todo.append(nb)
        if len(seen) < len(nodes):
            lost = next(i for i in nodes if i not in seen)
            self.fail(
                links or None,
                f"the graph is not connected: node {lost} (node[{index[lost]}]) cannot be"
                f" reached from node {first} ({len(nodes) - len(seen)} of {len(nodes)}"
                " nodes unreachable)",
            )

        specs = {
            node_id: NodeSpec(node_id, host, peer, client, tuple(sorted(adj[node_id])))
            for node_id, (host, peer, client) in nodes.items()
        }
        return ClusterConfig(
            name=name,
            nodes=specs,
            max_message_bytes=max_bytes,
            allow_any_degree=any_degree,
            dissemination=dissemination,
            reconnect_max_delay=reconnect,
            ping_interval=ping,
            idle_timeout=idle,
            sync_interval=sync_interval,
            sync_timeout=sync_timeout,
            fsync=fsync,
            source=self.source,
        )

    def node_fields(self, tables: list[Mapping[str, object]]) -> dict[int, tuple[str, int, int]]:
        """id -> (host, peer_port, client_port), in file order."""
        nodes: dict[int, tuple[str, int, int]] = {}
        where_id: dict[int, str] = {}
        ports: dict[tuple[str, int], str] = {}
        for k, t in enumerate(tables, 1):
            where = f"node[{k}]"
            self.check_keys(t, _NODE_KEYS, where)
            node_id = self.get_int(t, "id", where, 0, MAX_NODE_ID)
            if node_id in where_id:
                self.fail(f"{where}.id", f"id {node_id} is already used by {where_id[node_id]}")
            where_id[node_id] = where
            host = self.get_str(t, "host", where)
            peer = self.get_int(t, "peer_port", where, 1, 65535)
            client = self.get_int(t, "client_port", where, 1, 65535)
            for key, port in (("peer_port", peer), ("client_port", client)):
                addr = (host.strip().lower(), port)
                if addr in ports:
                    self.fail(f"{where}.{key}", f"port {port} is already used by {ports[addr]}")
                ports[addr] = f"{where}.{key}"
            nodes[node_id] = (host, peer, client)
        return nodes

    def neighbour_lists(
        self, tables: list[Mapping[str, object]], nodes: Mapping[int, object]
    ) -> dict[int, set[int]]:
        adj: dict[int, set[int]] = {}
        for (k, t), node_id in zip(enumerate(tables, 1), nodes, strict=True):
            where = f"node[{k}]"
            if "neighbours" not in t:
                self.fail(where, "missing key 'neighbours' (or give [graph].edges)")
            value = t["neighbours"]
            field = f"{where}.neighbours"
            if not isinstance(value, list):
                self.fail(field, f"expected an array of node ids, got {_describe(value)}")
            nbs: set[int] = set()
            for nb in value:
                if not isinstance(nb, int) or isinstance(nb, bool):
                    self.fail(field, f"expected node ids (integers), got {_describe(nb)}")
                if nb == node_id:
                    self.fail(field, f"node {node_id} lists itself as a neighbour")
                if nb not in nodes:
                    self.fail(field, f"{nb} is not a node id (ids: {format_ids(nodes)})")
                if nb in nbs:
                    self.fail(field, f"{nb} is listed twice")
                nbs.add(nb)
            adj[node_id] = nbs
        index = {node_id: k for k, node_id in enumerate(nodes, 1)}
        for node_id, nbs in adj.items():
            for nb in sorted(nbs):
                if node_id not in adj[nb]:
                    self.fail(
                        f"node[{index[node_id]}].neighbours",
                        f"node[{index[node_id]}] (id {node_id}) lists {nb} as a neighbour"
                        f" but node {nb} does not list {node_id}",
                    )
        return adj

    def edge_list(self, value: object, nodes: Mapping[int, object]) -> dict[int, set[int]]:
        if not isinstance(value, list):
            self.fail("graph.edges", f"expected an array of [a, b] pairs, got {_describe(value)}")
        adj: dict[int, set[int]] = {node_id: set() for node_id in nodes}
        first_seen: dict[tuple[int, int], int] = {}
        for k, edge in enumerate(value, 1):
            where = f"graph.edges[{k}]"
            if not (isinstance(edge, list) and len(edge) == 2 and all(map(_is_int, edge))):
                self.fail(where, f"expected a pair of node ids like [1, 2], got {_describe(edge)}")
            a, b = edge
            for end in (a, b):
                if end not in nodes:
                    self.fail(where, f"{end} is not a node id (ids: {format_ids(nodes)})")
            if a == b:
                self.fail(where, f"[{a}, {b}] links node {a} to itself")
            key = (min(a, b), max(a, b))
            if key in first_seen:
                self.fail(
                    where, f"edge [{a}, {b}] is given twice (also graph.edges[{first_seen[key]}])"
                )
            first_seen[key] = k
            adj[a].add(b)
            adj[b].add(a)
        return adj
