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
    tls = false                    # true: mutual TLS on peer links (gossip.net.tls)
    tls_ca = "tls/ca-bundle.crt"   # CA certificates peers must be signed by (a bundle)
    tls_cert = "tls/node-{id}.crt" # each node's certificate and key; {id} = the node's id;
    tls_key = "tls/node-{id}.key"  # paths are relative to the cluster file's directory
    client_token_file = "client.token"  # clients must Login with this token (default: none)
    client_read_without_token = false   # true: reading needs no token (submitting does)
    # Rates and bounds (client_submit_rate, origin_rate, client_max_connections, ...):
    # see gossip.settings and the README's configuration reference.

    [[node]]                       # one table per node, at least one
    id = 1                         # integer, 0 <= id < 2**31, unique
    host = "127.0.0.1"             # non-empty string
    peer_port = 17001              # 1..65535
    client_port = 17101            # 1..65535; no (host, port) is used twice
    neighbours = [2, 5, 9]         # node ids; required unless [graph].edges is given
    # Optional Twisted endpoint descriptions; each one left out is derived from
    # host and the port (listen on host's interface, dial host):
    peer_listen = "tcp:17001:interface=0.0.0.0"           # serverFromString
    peer_address = "tcp:host=gossip-0.gossip:port=17001"  # clientFromString
    client_listen = "tcp:17101:interface=0.0.0.0"
    client_address = "tcp:host=gossip-0.gossip:port=17101"
    tls_cert = "/etc/gossip/node.crt"  # optional: this node's files instead of the
    tls_key = "/etc/gossip/node.key"   # cluster's tls_cert / tls_key
    client_token_file = "..."          # optional: this node's client token file

host, peer_port and client_port are needed only for the endpoints they derive.
The [cluster] keys, their defaults and bounds are declared in ``gossip.settings``.

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
Unknown keys are errors, so that a typo cannot pass silently. Endpoint
descriptions are checked with Twisted's own parsers (against a ``MemoryReactor``,
so nothing listens or dials), and two nodes may not listen on one address of a
machine (the machine being the node's host) nor share an address.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import attrs

from gossip import settings
from gossip.settings import (
    DISSEMINATIONS,
    FSYNC_POLICIES,
    MAX_MESSAGE_BYTES_LIMIT,
    MAX_NODE_ID,
    Setting,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEGREE",
    "DISSEMINATIONS",
    "FSYNC_POLICIES",
    "MAX_MESSAGE_BYTES_LIMIT",
    "MAX_NODE_ID",
    "ClusterConfig",
    "ConfigError",
    "NodeSpec",
    "config_from_dict",
    "dump_config",
    "load_config",
    "parse_config",
    "web_url",
]

DEGREE = 3
DEFAULT_MAX_MESSAGE_BYTES = settings.MAX_MESSAGE_BYTES.default

_TOP_KEYS = ("cluster", "node", "graph")
_CLUSTER_KEYS = tuple(s.name for s in settings.CLUSTER_SETTINGS)
_NODE_KEYS = tuple(s.name for s in settings.NODE_KEYS)
_GRAPH_KEYS = ("edges",)
ENDPOINT_KEYS = ("peer_listen", "peer_address", "client_listen", "client_address")
_WILDCARDS = ("", "0.0.0.0", "::")


class ConfigError(Exception):
    """The cluster file cannot be used; ``str()`` is one line that says where and why."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def quote(argument: str) -> str:
    """Escape ``:`` and ``\\`` for an endpoint description, as Twisted's
    ``endpoints.quoteStringArgument`` does (kept here so that reading a cluster
    file imports no Twisted)."""
    return argument.replace("\\", "\\\\").replace(":", "\\:")


def listen_description(host: str, port: int) -> str:
    """The server endpoint for ``port`` on ``host``'s interface (``tcp6`` for an IPv6 literal)."""
    try:
        ipv6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        ipv6 = False
    return f"{'tcp6' if ipv6 else 'tcp'}:{port}:interface={quote(host)}"


def address_description(host: str, port: int) -> str:
    """The client endpoint that dials ``host`` (resolved at each dial) on ``port``."""
    return f"tcp:host={quote(host)}:port={port}"


def _derived(spec: NodeSpec, key: str) -> str | None:
    """What ``key`` is when the file leaves it out, or None if host or port are missing."""
    port = spec.peer_port if key.startswith("peer") else spec.client_port
    if spec.host is None or port is None:
        return None
    if key.endswith("listen"):
        return listen_description(spec.host, port)
    return address_description(spec.host, port)


_TCP_KINDS = ("tcp", "tcp6", "ssl", "tls")


def _parsed(description: str) -> tuple[list[str], dict[str, str]]:
    from twisted.internet.endpoints import _parse  # Twisted's own tokenizer (escapes, ':' '=')

    args, kw = _parse(description)
    return [str(a) for a in args], {str(k): str(v) for k, v in kw.items()}


def listen_key(description: str) -> tuple[str, str, str]:
    """(family, port, interface) of a server description, to find overlapping listens.
    Every TCP-based kind is family "tcp"; other kinds compare by their whole text."""
    args, kw = _parsed(description)
    kind = args[0].lower() if args else ""
    if kind not in _TCP_KINDS:
        return kind, description.strip(), ""
    port = kw.get("port", args[1] if len(args) > 1 else "")
    default_interface = "::" if kind == "tcp6" else ""
    return "tcp", port, kw.get("interface", default_interface).lower()


def address_key(description: str) -> tuple[str, str, str]:
    """(family, port, host) of a client description."""
    args, kw = _parsed(description)
    kind = args[0].lower() if args else ""
    if kind not in _TCP_KINDS:
        return kind, description.strip(), ""
    rest = args[1:]
    host = kw.get("host", rest.pop(0) if rest else "")
    return "tcp", kw.get("port", rest[0] if rest else ""), host


def web_url(listen: str | None) -> str | None:
    """``http://HOST:PORT/`` for a TCP ``web_listen`` (a wildcard interface: 127.0.0.1)."""
    if listen is None:
        return None
    kind, port, interface = listen_key(listen)
    if kind != "tcp":
        return None
    if interface in _WILDCARDS:
        interface = "127.0.0.1"
    host = f"[{interface}]" if ":" in interface else interface
    return f"http://{host}:{port}/"


def _machine(spec: NodeSpec) -> str:
    """Which host a node runs on, as far as the file tells: its host, else its peer address's."""
    if spec.host is not None:
        return spec.host.strip().lower()
    family, _, host = address_key(spec.peer_address)
    return host.lower() if family == "tcp" and host else spec.peer_address


def _default_endpoint(key: str) -> Any:
    def derive(spec: NodeSpec) -> str:
        value = _derived(spec, key)
        if value is None:
            raise ValueError(f"node {spec.id}: {key} needs host and a port to derive it from")
        return value

    return attrs.Factory(derive, takes_self=True)


@attrs.frozen
class NodeSpec:
    """One node. The four endpoint descriptions are always set: given, or derived from
    host and the ports (which are None when the file gives every endpoint they feed)."""

    id: int
    host: str | None
    peer_port: int | None
    client_port: int | None
    neighbours: tuple[int, ...]  # sorted
    peer_listen: str = _default_endpoint("peer_listen")
    peer_address: str = _default_endpoint("peer_address")
    client_listen: str = _default_endpoint("client_listen")
    client_address: str = _default_endpoint("client_address")
    # This node's TLS files when the file names them for it (else the cluster's).
    tls_cert: str | None = None
    tls_key: str | None = None
    # This node's client token file when the file names one for it (else the cluster's).
    client_token_file: str | None = None
    # The HTTP site (metrics, dashboard): only when the file gives it; never derived.
    web_listen: str | None = None


@attrs.frozen
class TLSFiles:
    """Where one node finds what peer TLS needs; paths as the operator can read them."""

    ca: str
    cert: str
    key: str


@attrs.frozen
class ClusterConfig:
    name: str
    # Keyed by node id, in file order. Left out of the hash (a dict has none);
    # equality still compares it.
    nodes: dict[int, NodeSpec] = attrs.field(hash=False)
    # Defaults come from the settings table (gossip.settings).
    max_message_bytes: int = settings.MAX_MESSAGE_BYTES.default
    allow_any_degree: bool = settings.ALLOW_ANY_DEGREE.default
    dissemination: str = settings.DISSEMINATION.default
    reconnect_max_delay: float = settings.RECONNECT_MAX_DELAY.default
    ping_interval: float = settings.PING_INTERVAL.default
    idle_timeout: float = settings.IDLE_TIMEOUT.default
    sync_interval: float = settings.SYNC_INTERVAL.default
    sync_timeout: float = settings.SYNC_TIMEOUT.default
    fsync: str = settings.FSYNC.default
    tls: bool = settings.TLS.default
    tls_ca: str = settings.TLS_CA.default
    tls_cert: str = settings.TLS_CERT.default
    tls_key: str = settings.TLS_KEY.default
    client_token_file: str = settings.CLIENT_TOKEN_FILE.default
    client_read_without_token: bool = settings.CLIENT_READ_WITHOUT_TOKEN.default
    client_submit_rate: int = settings.CLIENT_SUBMIT_RATE.default
    client_submit_burst: int = settings.CLIENT_SUBMIT_BURST.default
    origin_rate: int = settings.ORIGIN_RATE.default
    origin_burst: int = settings.ORIGIN_BURST.default
    client_max_connections: int = settings.CLIENT_MAX_CONNECTIONS.default
    client_max_per_source: int = settings.CLIENT_MAX_PER_SOURCE.default
    client_idle_timeout: float = settings.CLIENT_IDLE_TIMEOUT.default
    client_max_outstanding: int = settings.CLIENT_MAX_OUTSTANDING.default
    client_max_buffered_bytes: int = settings.CLIENT_MAX_BUFFERED_BYTES.default
    client_max_watchers: int = settings.CLIENT_MAX_WATCHERS.default
    max_waiting_submit_bytes: int = settings.MAX_WAITING_SUBMIT_BYTES.default
    peer_max_handshakes: int = settings.PEER_MAX_HANDSHAKES.default
    peer_max_handshakes_per_source: int = settings.PEER_MAX_HANDSHAKES_PER_SOURCE.default
    peer_hello_timeout: float = settings.PEER_HELLO_TIMEOUT.default
    peer_max_queued_bytes: int = settings.PEER_MAX_QUEUED_BYTES.default
    overlay: str = settings.OVERLAY.default
    replace_after: float = settings.REPLACE_AFTER.default
    overlay_max_degree: int = settings.OVERLAY_MAX_DEGREE.default
    join: tuple[str, ...] = settings.JOIN.default
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

    def tls_files(self, node_id: int) -> TLSFiles:
        """Node ``node_id``'s CA bundle, certificate and key: ``{id}`` replaced, and a
        relative path taken from the cluster file's directory (every host reads the
        same file, so the paths must not depend on where a node was started)."""
        spec = self.node(node_id)
        base = os.path.dirname(self.source) if not self.source.startswith("<") else ""

        def path(template: str) -> str:
            return os.path.join(base, template.replace("{id}", str(node_id)))

        return TLSFiles(
            path(self.tls_ca),
            path(spec.tls_cert if spec.tls_cert is not None else self.tls_cert),
            path(spec.tls_key if spec.tls_key is not None else self.tls_key),
        )

    def client_token_path(self, node_id: int) -> str | None:
        """Node ``node_id``'s client token file (``{id}`` replaced, relative to the cluster
        file's directory), or None when its clients need no token."""
        spec = self.node(node_id)
        template = spec.client_token_file or self.client_token_file
        if not template:
            return None
        base = os.path.dirname(self.source) if not self.source.startswith("<") else ""
        return os.path.join(base, template.replace("{id}", str(node_id)))

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
    lines = [f"# gossip cluster {config.name!r}: {len(config.nodes)} nodes", "[cluster]"]
    for s in settings.CLUSTER_SETTINGS:
        value = getattr(config, s.name)
        if s.kind == settings.PATH and value == "":
            continue  # an optional file that is not set (client_token_file)
        lines.append(f"{s.name} = {_toml_value(value)}")
    for spec in config.nodes.values():
        lines += ["", "[[node]]", f"id = {spec.id}"]
        for key in ("host", "peer_port", "client_port"):
            value = getattr(spec, key)
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        for key in ENDPOINT_KEYS:
            value = getattr(spec, key)
            if value != _derived(spec, key):
                lines.append(f"{key} = {_toml_str(value)}")
        for key in ("tls_cert", "tls_key", "client_token_file"):
            value = getattr(spec, key)
            if value is not None:
                lines.append(f"{key} = {_toml_str(value)}")
        if spec.web_listen is not None:
            lines.append(f"web_listen = {_toml_str(spec.web_listen)}")
        lines.append(f"neighbours = [{', '.join(str(nb) for nb in spec.neighbours)}]")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _toml_float(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


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
        self._reactor: Any = None

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

    def setting(
        self, table: Mapping[str, object], s: Setting[object], earlier: Mapping[str, Any]
    ) -> Any:
        """The value of one [cluster] setting, checked as the settings table declares it."""
        where = "cluster"
        field = f"{where}.{s.name}"
        if s.kind == settings.INTEGER:
            assert s.low is not None and s.high is not None
            default = None if s.required else int(s.default)  # type: ignore[call-overload]
            return self.get_int(table, s.name, where, s.low, s.high, default, s.why)
        if s.kind == settings.BOOLEAN:
            return self.get_bool(table, s.name, where, bool(s.default))
        if s.kind == settings.ENDPOINTS:
            return self.endpoint_list(table, s.name, field)
        if s.kind in (settings.STRING, settings.CHOICE, settings.PATH):
            text = self.get_str(table, s.name, where, None if s.required else str(s.default))
            if s.choices and text not in s.choices:
                self.fail(field, f"unknown {s.noun} {text!r} (allowed: {', '.join(s.choices)})")
            return text
        assert s.kind == settings.SECONDS, s.kind
        value = table.get(s.name, s.default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(field, f"expected a number of seconds, got {_describe(value)}")
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(field, f"must be a positive number of seconds, got {_show(value)}")
        if s.greater_than is not None and seconds <= earlier[s.greater_than]:
            self.fail(
                field,
                f"{seconds:g} must be greater than cluster.{s.greater_than}"
                f" ({earlier[s.greater_than]:g})",
            )
        return seconds

    # -- the file --------------------------------------------------------

    def build(self, data: Mapping[str, object]) -> ClusterConfig:
        self.check_keys(data, _TOP_KEYS, "")
        if "cluster" not in data:
            self.fail(None, "missing [cluster] table")
        cluster = self.table(data["cluster"], "cluster")
        self.check_keys(cluster, _CLUSTER_KEYS, "cluster")
        values: dict[str, Any] = {}
        for setting in settings.CLUSTER_SETTINGS:
            values[setting.name] = self.setting(cluster, setting, values)

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
        # In the dynamic overlay the file's links are only the preferred ones: a node
        # joining a running cluster may name just itself, with no neighbours.
        dynamic = values["overlay"] == "dynamic"
        if not values["allow_any_degree"] and not dynamic:
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
        if len(seen) < len(nodes) and not dynamic:
            lost = next(i for i in nodes if i not in seen)
            self.fail(
                links or None,
                f"the graph is not connected: node {lost} (node[{index[lost]}]) cannot be"
                f" reached from node {first} ({len(nodes) - len(seen)} of {len(nodes)}"
                " nodes unreachable)",
            )

        specs = {
            node_id: attrs.evolve(spec, neighbours=tuple(sorted(adj[node_id])))
            for node_id, spec in nodes.items()
        }
        if values["tls"]:
            self.plain_peer_endpoints(nodes)
        return ClusterConfig(nodes=specs, source=self.source, **values)

    def plain_peer_endpoints(self, nodes: Mapping[int, NodeSpec]) -> None:
        """With cluster.tls the node adds TLS to its peer endpoints itself: one that is
        TLS already would wrap it twice (and skip the node-id check)."""
        for k, spec in enumerate(nodes.values(), 1):  # in file order: node[k]
            for key in ("peer_listen", "peer_address"):
                args, _ = _parsed(getattr(spec, key))
                if args and args[0].lower() in ("ssl", "tls"):
                    self.fail(
                        f"node[{k}].{key}",
                        f"{getattr(spec, key)!r} is a TLS endpoint, but cluster.tls = true"
                        " adds TLS itself: give the plain one (tcp:...)",
                    )

    def node_fields(self, tables: list[Mapping[str, object]]) -> dict[int, NodeSpec]:
        """id -> NodeSpec without neighbours yet, in file order."""
        nodes: dict[int, NodeSpec] = {}
        where_id: dict[int, str] = {}
        ports: dict[tuple[str, int], str] = {}
        for k, t in enumerate(tables, 1):
            where = f"node[{k}]"
            self.check_keys(t, _NODE_KEYS, where)
            node_id = self.get_int(t, "id", where, 0, MAX_NODE_ID)
            if node_id in where_id:
                self.fail(f"{where}.id", f"id {node_id} is already used by {where_id[node_id]}")
            where_id[node_id] = where
            given = {key: self.get_str(t, key, where) for key in ENDPOINT_KEYS if key in t}
            needs = [key for key in ENDPOINT_KEYS if key not in given]
            host = self.optional(t, "host", where, needs, self.get_str, ENDPOINT_KEYS)
            peer = self.optional(
                t, "peer_port", where, needs, self.get_port, ("peer_listen", "peer_address")
            )
            client = self.optional(
                t, "client_port", where, needs, self.get_port, ("client_listen", "client_address")
            )
            if host is not None:
                for key, port in (("peer_port", peer), ("client_port", client)):
                    if port is None:
                        continue
                    addr = (host.strip().lower(), port)
                    if addr in ports:
                        self.fail(f"{where}.{key}", f"port {port} is already used by {ports[addr]}")
                    ports[addr] = f"{where}.{key}"
            files = {
                key: self.get_str(t, key, where)
                for key in ("tls_cert", "tls_key", "client_token_file")
                if key in t
            }
            web = self.get_str(t, "web_listen", where) if "web_listen" in t else None
            spec = NodeSpec(node_id, host, peer, client, (), **given, **files, web_listen=web)
            for key in ENDPOINT_KEYS:
                self.endpoint(getattr(spec, key), key.endswith("listen"), f"{where}.{key}")
            if web is not None:
                self.endpoint(web, True, f"{where}.web_listen")
            nodes[node_id] = spec
        self.unique_endpoints(nodes, where_id)
        return nodes

    def endpoint(self, description: str, server: bool, field: str) -> None:
        """Check a description with Twisted's own parser, against a MemoryReactor."""
        from twisted.internet.endpoints import clientFromString, serverFromString
        from twisted.internet.testing import MemoryReactor

        parse = serverFromString if server else clientFromString
        if self._reactor is None:
            self._reactor = MemoryReactor()  # one for the file: nothing listens or dials
        try:
            parse(self._reactor, description)
            family, port, _ = listen_key(description) if server else address_key(description)
        except Exception as e:
            what = "server" if server else "client"
            problem = str(e).strip() or type(e).__name__
            self.fail(field, f"not a {what} endpoint description ({description!r}): {problem}")
        if family == "tcp" and not (port.isdigit() and 1 <= int(port) <= 65535):
            self.fail(field, f"port {port!r} in {description!r} is out of range: must be 1..65535")

    def endpoint_list(self, table: Mapping[str, object], key: str, field: str) -> tuple[str, ...]:
        """A list of client endpoint descriptions (``cluster.join``)."""
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(field, f"expected a list of endpoint descriptions, got {_describe(value)}")
        for k, description in enumerate(value, 1):
            self.endpoint(description, False, f"{field}[{k}]")
        return tuple(value)

    def get_port(self, table: Mapping[str, object], key: str, where: str) -> int:
        return self.get_int(table, key, where, 1, 65535)

    def optional(
        self,
        table: Mapping[str, object],
        key: str,
        where: str,
        needs: list[str],
        get: Any,
        feeds: tuple[str, ...],
    ) -> Any:
        """A shorthand key: read if present; missing is an error only if an endpoint needs it."""
        if key in table:
            return get(table, key, where)
        wanted = [k for k in feeds if k in needs]
        if not wanted:
            return None
        if len(needs) == len(ENDPOINT_KEYS):
            self.fail(where, f"missing key {key!r}")
        self.fail(where, f"missing key {key!r} (needed to derive {' and '.join(wanted)})")

    def unique_endpoints(self, nodes: Mapping[int, NodeSpec], where_id: Mapping[int, str]) -> None:
        """No two listen endpoints of one machine overlap; no two nodes share an address."""
        listens: dict[tuple[str, str], list[tuple[tuple[str, str, str], str]]] = {}
        addresses: dict[str, str] = {}
        for node_id, spec in nodes.items():
            where = where_id[node_id]
            machine = _machine(spec)
            for key in ("peer_listen", "client_listen", "web_listen"):
                field = f"{where}.{key}"
                if getattr(spec, key) is None:
                    continue
                kind, port, interface = listen_key(getattr(spec, key))
                for (okind, _, ointerface), other in listens.get((machine, port), []):
                    wildcard = interface in _WILDCARDS or ointerface in _WILDCARDS
                    if okind == kind and (interface == ointerface or wildcard):
                        self.fail(
                            field,
                            f"{getattr(spec, key)!r} listens on port {port} like {other}"
                            f" on host {machine!r}",
                        )
                listens.setdefault((machine, port), []).append(((kind, port, interface), field))
            for key in ("peer_address", "client_address"):
                field = f"{where}.{key}"
                value = getattr(spec, key).strip()
                if value in addresses:
                    self.fail(field, f"{value!r} is already used by {addresses[value]}")
                addresses[value] = field

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
