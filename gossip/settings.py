"""Every key of the cluster file, declared once: name, type, default, bounds, one-line doc.

This table drives the validation of ``[cluster]`` in ``gossip.config``, the
defaults of ``ClusterConfig`` and of the classes that take these settings
(``LinkTable``, ``GossipCore``), the help of a command-line flag that
overrides a setting (``--fsync``), and the configuration reference in the
README (``gossip-config --settings-markdown`` prints it; a test fails when the
README's copy differs).

Pure: no I/O and no Twisted, so the protocol core may import it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import attrs

T = TypeVar("T", covariant=True)

STRING, INTEGER, BOOLEAN, SECONDS, CHOICE, ENDPOINT, NODE_IDS, PATH, ENDPOINTS = (
    "string",
    "integer",
    "boolean",
    "seconds",
    "choice",
    "endpoint",
    "node ids",
    "path",
    "endpoints",
)


@attrs.frozen
class Setting(Generic[T]):
    """One key: how it is checked, what it defaults to, and its one-line doc."""

    name: str
    kind: str
    default: T
    doc: str
    required: bool = False
    low: int | None = None  # integers: inclusive bounds
    high: int | None = None
    why: str = ""  # appended to an out-of-range error
    choices: tuple[str, ...] = ()
    noun: str = ""  # choices: "unknown <noun> 'x'"
    greater_than: str | None = None  # seconds: must exceed this other setting
    flag: str | None = None  # a command-line flag that overrides the setting per node

    def allowed(self) -> str:
        """The allowed values, in words, for the reference table."""
        if self.kind == INTEGER and self.low is not None and self.high is not None:
            return f"{self.low}..{self.high}"
        if self.kind == CHOICE:
            return ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == SECONDS:
            return f"> {self.greater_than}" if self.greater_than else "> 0"
        if self.kind == BOOLEAN:
            return "true, false"
        if self.kind == STRING:
            return "non-empty"
        if self.kind == ENDPOINT:
            return "`serverFromString`" if self.name.endswith("listen") else "`clientFromString`"
        if self.kind == PATH:
            return "a file, relative to the cluster file's directory"
        if self.kind == ENDPOINTS:
            return "list of `clientFromString`"
        return "ids of other nodes"

    def help(self) -> str:
        """Help text for the setting's command-line flag."""
        choices = f" ({', '.join(self.choices)})" if self.choices else ""
        return f"{self.doc}{choices}; overrides the cluster file's {self.name}."


MAX_MESSAGE_BYTES_LIMIT = 60000  # AMP values are limited to 64 KiB, with room for framing
DISSEMINATIONS = ("plumtree", "flood")
OVERLAYS = ("static", "dynamic")
FSYNC_POLICIES = ("always", "batch", "never")
MAX_NODE_ID = 2**31 - 1

NAME: Setting[str] = Setting(
    "name", STRING, "", "cluster name, checked in the peer handshake", required=True
)
MAX_MESSAGE_BYTES: Setting[int] = Setting(
    "max_message_bytes",
    INTEGER,
    32768,
    "largest message accepted, in bytes (AMP values are limited to 64 KiB)",
    low=1,
    high=MAX_MESSAGE_BYTES_LIMIT,
    why=" (AMP values are limited to 64 KiB)",
)
ALLOW_ANY_DEGREE: Setting[bool] = Setting(
    "allow_any_degree", BOOLEAN, False, "true allows nodes with other than 3 neighbours"
)
DISSEMINATION: Setting[str] = Setting(
    "dissemination",
    CHOICE,
    "plumtree",
    'how a new message spreads: "flood" is the original design\'s rule',
    choices=DISSEMINATIONS,
    noun="strategy",
)
RECONNECT_MAX_DELAY: Setting[float] = Setting(
    "reconnect_max_delay", SECONDS, 5.0, "cap of the jittered exponential backoff of a redial"
)
PING_INTERVAL: Setting[float] = Setting(
    "ping_interval", SECONDS, 5.0, "keep-alive interval on idle links"
)
IDLE_TIMEOUT: Setting[float] = Setting(
    "idle_timeout",
    SECONDS,
    15.0,
    "a link silent this long is dropped and redialed",
    greater_than="ping_interval",
)
SYNC_INTERVAL: Setting[float] = Setting(
    "sync_interval", SECONDS, 10.0, "seconds between anti-entropy sessions with a neighbour"
)
SYNC_TIMEOUT: Setting[float] = Setting(
    "sync_timeout", SECONDS, 30.0, "a re-sync session that stalls this long is given up"
)
FSYNC: Setting[str] = Setting(
    "fsync",
    CHOICE,
    "batch",
    "when the message log is fsynced: before each acknowledgement, group commit, or never",
    choices=FSYNC_POLICIES,
    noun="fsync policy",
    flag="--fsync",
)
TLS: Setting[bool] = Setting(
    "tls",
    BOOLEAN,
    False,
    "true: peer links use mutual TLS, and a peer must hold a certificate from a CA of"
    " `tls_ca` naming the node id it claims (false: plain TCP, one warning at start)",
)
TLS_CA: Setting[str] = Setting(
    "tls_ca",
    PATH,
    "tls/ca-bundle.crt",
    "PEM file of the CA certificates peers' certificates must be signed by"
    " (old and new during a rotation)",
)
TLS_CERT: Setting[str] = Setting(
    "tls_cert",
    PATH,
    "tls/node-{id}.crt",
    "PEM file of a node's certificate (`{id}` is the node's id)",
)
TLS_KEY: Setting[str] = Setting(
    "tls_key",
    PATH,
    "tls/node-{id}.key",
    "PEM file of a node's private key (`{id}` is the node's id)",
)

CLIENT_TOKEN_FILE: Setting[str] = Setting(
    "client_token_file",
    PATH,
    "",
    "file holding the token a client must present (AMP `Login`) to submit, and to read"
    " unless `client_read_without_token`; `{id}` is the node's id (none: no client"
    " authentication, one warning at start)",
)
CLIENT_READ_WITHOUT_TOKEN: Setting[bool] = Setting(
    "client_read_without_token",
    BOOLEAN,
    False,
    "with a client token: true lets clients without it read (`Get`, `ListMessages`,"
    " `ListIds`, `Watch`, `Status`); submitting always needs the token",
)
CLIENT_SUBMIT_RATE: Setting[int] = Setting(
    "client_submit_rate",
    INTEGER,
    2000,
    "messages per second one client connection may submit (token bucket; over it a"
    ' submit is refused with the retryable "rate limit")',
    low=1,
    high=10_000_000,
)
CLIENT_SUBMIT_BURST: Setting[int] = Setting(
    "client_submit_burst",
    INTEGER,
    4000,
    "messages one client connection may submit at once beyond its rate",
    low=1,
    high=10_000_000,
)
ORIGIN_RATE: Setting[int] = Setting(
    "origin_rate",
    INTEGER,
    5000,
    "new messages per second a node accepts from all its clients together (the node"
    " as origin); a peer's frames may carry 2x this per origin before the excess is"
    " dropped and counted",
    low=1,
    high=10_000_000,
)
ORIGIN_BURST: Setting[int] = Setting(
    "origin_burst",
    INTEGER,
    20000,
    "new messages a node accepts from its clients at once beyond `origin_rate` (peers:"
    " 2x this per origin)",
    low=1,
    high=100_000_000,
)
CLIENT_MAX_CONNECTIONS: Setting[int] = Setting(
    "client_max_connections",
    INTEGER,
    1024,
    "client connections a node serves at once (over it a new one is closed at once)",
    low=1,
    high=1_000_000,
)
CLIENT_MAX_PER_SOURCE: Setting[int] = Setting(
    "client_max_per_source",
    INTEGER,
    64,
    "client connections from one source address (clients on the node's host share one)",
    low=1,
    high=1_000_000,
)
CLIENT_IDLE_TIMEOUT: Setting[float] = Setting(
    "client_idle_timeout",
    SECONDS,
    120.0,
    "a client connection with no request in progress and no `Watch` is closed after this",
)
CLIENT_MAX_OUTSTANDING: Setting[int] = Setting(
    "client_max_outstanding",
    INTEGER,
    64,
    "requests one client connection may have in progress; beyond it the node stops"
    " reading that connection until answers went out",
    low=1,
    high=100_000,
)
CLIENT_MAX_BUFFERED_BYTES: Setting[int] = Setting(
    "client_max_buffered_bytes",
    INTEGER,
    256 * 1024,
    "bytes of an unfinished client request a node holds; a connection over it is closed",
    low=70_000,
    high=64 * 1024 * 1024,
    why=" (one request may be 64 KiB)",
)
CLIENT_MAX_WATCHERS: Setting[int] = Setting(
    "client_max_watchers",
    INTEGER,
    256,
    "client connections that may follow the node (`Watch`) at once; more are refused",
    low=1,
    high=1_000_000,
)
MAX_WAITING_SUBMIT_BYTES: Setting[int] = Setting(
    "max_waiting_submit_bytes",
    INTEGER,
    4 * 1024 * 1024,
    "bytes of submits that may wait while a neighbour's link is full; beyond it submits"
    ' are refused at once as "busy"',
    low=65_536,
    high=1 << 34,
)
PEER_MAX_HANDSHAKES: Setting[int] = Setting(
    "peer_max_handshakes",
    INTEGER,
    64,
    "inbound peer connections still in their handshake, in all",
    low=1,
    high=1_000_000,
)
PEER_MAX_HANDSHAKES_PER_SOURCE: Setting[int] = Setting(
    "peer_max_handshakes_per_source",
    INTEGER,
    8,
    "inbound peer connections still in their handshake from one source address",
    low=1,
    high=1_000_000,
)
PEER_HELLO_TIMEOUT: Setting[float] = Setting(
    "peer_hello_timeout",
    SECONDS,
    3.0,
    "an inbound peer connection must deliver its whole `Hello` within this",
)
PEER_MAX_QUEUED_BYTES: Setting[int] = Setting(
    "peer_max_queued_bytes",
    INTEGER,
    64 * 1024 * 1024,
    "bytes queued for a neighbour that does not read; over it the link is dropped"
    " (it catches up by re-sync)",
    low=1 << 20,
    high=1 << 34,
)
OVERLAY: Setting[str] = Setting(
    "overlay",
    CHOICE,
    "static",
    'the links: "static" keeps the file\'s graph; "dynamic" replaces unreachable'
    " neighbours, lets nodes join and leave (the file's neighbours are preferred)",
    choices=OVERLAYS,
    noun="overlay",
)
REPLACE_AFTER: Setting[float] = Setting(
    "replace_after",
    SECONDS,
    10.0,
    "dynamic overlay: a neighbour no node has reported linked for this long is replaced",
)
OVERLAY_MAX_DEGREE: Setting[int] = Setting(
    "overlay_max_degree",
    INTEGER,
    5,
    "dynamic overlay: a node accepts links from replacing or joining nodes up to this degree",
    low=3,
    high=64,
)
JOIN: Setting[tuple[str, ...]] = Setting(
    "join",
    ENDPOINTS,
    (),
    "dynamic overlay: peer endpoints of running nodes a node dials to join the cluster"
    " (`gossip-node --join` gives them per node)",
    flag="--join",
)

# The [cluster] table, in the order the file and the reference list them.
CLUSTER_SETTINGS: tuple[Setting[object], ...] = (
    NAME,
    MAX_MESSAGE_BYTES,
    ALLOW_ANY_DEGREE,
    DISSEMINATION,
    RECONNECT_MAX_DELAY,
    PING_INTERVAL,
    IDLE_TIMEOUT,
    SYNC_INTERVAL,
    SYNC_TIMEOUT,
    FSYNC,
    TLS,
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    CLIENT_TOKEN_FILE,
    CLIENT_READ_WITHOUT_TOKEN,
    CLIENT_SUBMIT_RATE,
    CLIENT_SUBMIT_BURST,
    ORIGIN_RATE,
    ORIGIN_BURST,
    CLIENT_MAX_CONNECTIONS,
    CLIENT_MAX_PER_SOURCE,
    CLIENT_IDLE_TIMEOUT,
    CLIENT_MAX_OUTSTANDING,
    CLIENT_MAX_BUFFERED_BYTES,
    CLIENT_MAX_WATCHERS,
    MAX_WAITING_SUBMIT_BYTES,
    PEER_MAX_HANDSHAKES,
    PEER_MAX_HANDSHAKES_PER_SOURCE,
    PEER_HELLO_TIMEOUT,
    PEER_MAX_QUEUED_BYTES,
    OVERLAY,
    REPLACE_AFTER,
    OVERLAY_MAX_DEGREE,
    JOIN,
)

# The keys of a [[node]] table (validated in gossip.config, where they depend on each other).
NODE_KEYS: tuple[Setting[object], ...] = (
    Setting("id", INTEGER, 0, "the node's id, unique", required=True, low=0, high=MAX_NODE_ID),
    Setting("host", STRING, "", "shorthand: the address every derived endpoint uses"),
    Setting("peer_port", INTEGER, 0, "shorthand: the peer port", low=1, high=65535),
    Setting("client_port", INTEGER, 0, "shorthand: the client (AMP) port", low=1, high=65535),
    Setting(
        "peer_listen",
        ENDPOINT,
        "tcp:PEER_PORT:interface=HOST",
        "server endpoint the node listens on for peers (tcp6 when HOST is an IPv6 literal)",
    ),
    Setting(
        "peer_address",
        ENDPOINT,
        "tcp:host=HOST:port=PEER_PORT",
        "client endpoint neighbours dial (host names are resolved at each dial)",
    ),
    Setting(
        "client_listen",
        ENDPOINT,
        "tcp:CLIENT_PORT:interface=HOST",
        "server endpoint the node listens on for clients",
    ),
    Setting(
        "client_address",
        ENDPOINT,
        "tcp:host=HOST:port=CLIENT_PORT",
        "client endpoint gclient and the Python API dial",
    ),
    Setting(
        "web_listen",
        ENDPOINT,
        "",
        "server endpoint of the node's HTTP site (/metrics for Prometheus); none when left out",
    ),
    Setting(
        "neighbours",
        NODE_IDS,
        (),
        "ids of the node's neighbours (or give [graph] edges instead)",
    ),
    Setting("tls_cert", PATH, "", "this node's certificate, instead of `cluster.tls_cert`"),
    Setting("tls_key", PATH, "", "this node's private key, instead of `cluster.tls_key`"),
    Setting(
        "client_token_file",
        PATH,
        "",
        "this node's client token file, instead of `cluster.client_token_file`",
    ),
)


def _show_default(s: Setting[object]) -> str:
    if s.required:
        return "required"
    if s.kind == BOOLEAN:
        return "`true`" if s.default else "`false`"
    if s.kind == NODE_IDS:
        return "required"
    if s.kind == ENDPOINT:
        return f"`{s.default}`" if s.default else "—"
    if s.kind == ENDPOINTS:
        return "`[]`"
    if s.kind == PATH and s.default == "":
        return "none" if s in CLUSTER_SETTINGS else "the cluster's"
    if s.kind == INTEGER and s.default == 0:
        return "—"
    if s.kind == STRING and s.default == "":
        return "—"
    if isinstance(s.default, str):
        return f'`"{s.default}"`'
    return f"`{s.default}`"


def _table(settings: tuple[Setting[object], ...]) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in settings:
        doc = s.doc + (f" (`{s.flag}` overrides it for one node)" if s.flag else "")
        lines.append(f"| `{s.name}` | {s.kind} | {_show_default(s)} | {s.allowed()} | {doc} |")
    return lines


def settings_markdown() -> str:
    """The README's configuration reference: one table for [cluster], one for [[node]]."""
    return "\n".join(
        [
            "`[cluster]`:",
            "",
            *_table(CLUSTER_SETTINGS),
            "",
            "`[[node]]` (each endpoint key left out is derived from `host` and the port):",
            "",
            *_table(NODE_KEYS),
        ]
    )
