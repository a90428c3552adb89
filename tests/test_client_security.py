"""Client authentication, per-connection limits and bad client input, against a real
GossipNode over an in-memory AMP connection (``iosim``), and gclient's own checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.test import iosim

from gossip.client import cli
from gossip.client.api import (
    ClientAMP,
    GossipClient,
    MessageRejected,
    NotAuthenticated,
    RateLimited,
    TokenError,
    client_token,
)
from gossip.client.commands import (
    Get,
    ListMessages,
    Login,
    NodeBusy,
    Status,
    Submit,
    SubmitMany,
    Watch,
)
from gossip.client.responder import ClientLimits, ClientProtocol
from gossip.config import dump_config, load_config
from gossip.node import GossipNode, StartupError
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config

TOKEN = b"s3cret-token-0123456789"


class Node:
    """A node on a fake clock; ``connect()`` gives a new client connection to it."""

    def __init__(
        self, tmp: Path, token: bytes | None = TOKEN, limits: ClientLimits | None = None, **kw: Any
    ) -> None:
        config = generate_config(4, name="sec")
        if token is not None:
            (tmp / "client.token").write_bytes(token + b"\n")
            kw["client_token_file"] = "client.token"
        path = tmp / "cluster.toml"
        path.write_text(dump_config(attrs.evolve(config, **kw)))
        self.config = load_config(path)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000.0)
        self.store = MemoryStore()
        self.node = GossipNode(self.config, 1, self.store, self.reactor)
        self.limits = limits or ClientLimits.from_config(self.config)

    def connect(self) -> tuple[GossipClient, ClientProtocol, iosim.IOPump]:
        client, server, pump = iosim.connectedServerAndClient(
            lambda: ClientProtocol(self.node, self.limits), ClientAMP
        )
        return GossipClient(client, "node 1"), server, pump

    def settle(self, pump: iosim.IOPump, d: Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        for _ in range(1000):
            if out:
                break
            self.reactor.advance(0)
            pump.flush()
        assert out, "no answer"
        return out[0]

    def call(
        self, api: GossipClient, pump: iosim.IOPump, command: type[amp.Command], **kw: Any
    ) -> Any:
        return self.settle(pump, api._call(command, **kw))


def failed_with(result: Any, error: type[Exception]) -> str:
    assert hasattr(result, "check") and result.check(error), result
    return str(result.value)


# -- tokens ----------------------------------------------------------------------


def test_a_client_without_credentials_cannot_submit(tmp_path: Path) -> None:
    """On a node with a client token, Submit and SubmitMany before Login are refused with
    NotAuthenticated ("node 1 refused: not authenticated ...") and store nothing; after
    Login with the token the same submit is stored."""
    n = Node(tmp_path)
    api, _, pump = n.connect()
    text = failed_with(n.call(api, pump, Submit, body="hello"), NotAuthenticated)
    assert text.startswith("node 1 refused: not authenticated")
    failed_with(n.call(api, pump, SubmitMany, bodies=["a", "b"]), NotAuthenticated)
    assert len(n.store) == 0
    assert n.call(api, pump, Login, token=TOKEN) == {}
    assert "id" in n.call(api, pump, Submit, body="hello")
    assert len(n.store) == 1


def test_a_wrong_token_is_refused_and_the_connection_closed(tmp_path: Path) -> None:
    """Login with a wrong token is answered NotAuthenticated ("wrong token") and the node
    closes that connection; nothing it sends after is served."""
    n = Node(tmp_path)
    api, server, pump = n.connect()
    text = failed_with(n.call(api, pump, Login, token=b"guess-guess-guess-guess"), NotAuthenticated)
    assert "wrong token" in text
    n.reactor.advance(0)
    pump.flush()
    assert server.transport is None or server.transport.disconnecting  # type: ignore[attr-defined]


@pytest.mark.parametrize("open_reads", [False, True])
def test_reading_without_a_token_is_the_documented_option(tmp_path: Path, open_reads: bool) -> None:
    """client_read_without_token = false: Get, ListMessages, Status and Watch need the token
    too; = true: they are served without it, and submitting still needs it."""
    n = Node(tmp_path, client_read_without_token=open_reads)
    api, _, pump = n.connect()
    reads = [
        n.call(api, pump, Status),
        n.call(api, pump, ListMessages, start=0, limit=10),
        n.call(api, pump, Get, id="1111"),
        n.call(api, pump, Watch, start=0),
    ]
    refused = [bool(hasattr(r, "check") and r.check(NotAuthenticated)) for r in reads]
    assert refused == [not open_reads] * 4
    failed_with(n.call(api, pump, Submit, body="x"), NotAuthenticated)


def test_a_node_without_a_token_accepts_login_and_needs_none(tmp_path: Path) -> None:
    """Without client_token_file every command is served before any Login, and a Login
    (a client that has a token file) is accepted."""
    n = Node(tmp_path, token=None)
    api, _, pump = n.connect()
    assert "id" in n.call(api, pump, Submit, body="open")
    assert n.call(api, pump, Login, token=b"anything-at-all-here") == {}


def test_connect_node_reads_the_token_from_the_cluster_file_or_token_file(tmp_path: Path) -> None:
    """client_token() gives the token the cluster file names for the node; token_file=
    wins; an unreadable token_file is a TokenError; an unreadable cluster-file token is
    no token plus a note that later explains a refusal."""
    n = Node(tmp_path)
    assert client_token(n.config, 1) == (TOKEN, "")
    other = tmp_path / "other.token"
    other.write_text("another-token-0123456789\n")
    assert client_token(n.config, 1, other) == (b"another-token-0123456789", "")
    with pytest.raises(TokenError, match="cannot read"):
        client_token(n.config, 1, tmp_path / "missing")
    (tmp_path / "client.token").unlink()
    token, note = client_token(n.config, 1)
    assert token is None and "client.token" in note


def test_a_node_whose_token_file_is_unusable_does_not_start(tmp_path: Path) -> None:
    """A missing or too-short token file stops the node at start with one line naming
    the setting and the file."""
    with pytest.raises(StartupError, match=r"client_token_file: .*at least 16 characters"):
        Node(tmp_path, token=b"short")


# -- per-connection limits -------------------------------------------------------------


def test_submits_over_the_connection_rate_are_refused_with_rate_limit(tmp_path: Path) -> None:
    """With client_submit_rate 10 and burst 3, a connection's 4th submit in the same
    instant is refused with RateLimited ("rate limit", retryable); after 0.1 s one more
    is taken; another connection has its own bucket. In a SubmitMany the bodies over
    the rate are answered one by one with the rate-limit text."""
    n = Node(tmp_path, token=None, client_submit_rate=10, client_submit_burst=3)
    api, _, pump = n.connect()
    for i in range(3):
        assert "id" in n.call(api, pump, Submit, body=f"m{i}")
    text = failed_with(n.call(api, pump, Submit, body="m3"), RateLimited)
    assert "rate limit" in text and "retry later" in text
    n.reactor.advance(0.1)
    assert "id" in n.call(api, pump, Submit, body="m3")
    other, _, other_pump = n.connect()
    r = n.call(other, other_pump, SubmitMany, bodies=["a", "b", "c", "d"])
    assert [bool(e) for e in r["errors"]] == [False, False, False, True]
    assert "rate limit" in r["errors"][3]


def test_the_origin_quota_refuses_submits_of_all_clients_together(tmp_path: Path) -> None:
    """origin_rate 5 / burst 2: two connections together get 2 new messages in, the 3rd
    is refused with RateLimited naming the node's rate."""
    n = Node(tmp_path, token=None, origin_rate=5, origin_burst=2)
    a, _, pa = n.connect()
    b, _, pb = n.connect()
    assert "id" in n.call(a, pa, Submit, body="one")
    assert "id" in n.call(b, pb, Submit, body="two")
    assert "rate limit" in failed_with(n.call(b, pb, Submit, body="three"), RateLimited)


def test_watchers_are_bounded(tmp_path: Path) -> None:
    """With client_max_watchers 2 a third connection's Watch is refused (NodeBusy); once
    a watcher closes, a new one is taken."""
    n = Node(tmp_path, token=None, client_max_watchers=2)
    conns = [n.connect() for _ in range(3)]
    for api, _, pump in conns[:2]:
        assert "durable" in n.call(api, pump, Watch, start=0)
    api, _, pump = conns[2]
    assert "2 connections follow it" in failed_with(n.call(api, pump, Watch, start=0), NodeBusy)
    first, _, first_pump = conns[0]
    first.close()
    first_pump.flush()
    assert "durable" in n.call(api, pump, Watch, start=0)


def test_a_request_that_never_ends_is_cut_off_at_the_buffer_bound(tmp_path: Path) -> None:
    """A client that sends an AMP box with ever more keys and never ends it: once the box
    holds more than client_max_buffered_bytes the node aborts the connection."""
    n = Node(tmp_path, token=None, client_max_buffered_bytes=70_000)
    _, server, _ = n.connect()
    transport = server.transport
    key = b"k"
    value = b"v" * 60_000
    piece = len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
    server.dataReceived(b"\x00\x04_ask\x00\x011")
    server.dataReceived(piece)
    assert not transport.disconnected  # type: ignore[union-attr]
    server.dataReceived(piece)
    assert transport.disconnecting or transport.disconnected  # type: ignore[union-attr]


# -- bad client input --------------------------------------------------------------


def non_utf8_argument() -> str:
    """What sys.argv holds for an argument that is not UTF-8 (surrogateescape)."""
    return b"caf\xe9".decode("utf-8", "surrogateescape")


def test_a_non_utf8_message_is_refused_by_the_api_before_sending(tmp_path: Path) -> None:
    """submit_message() with a str holding undecodable bytes (as from sys.argv) fails at
    once with MessageRejected ("not valid UTF-8"), in one line, sending nothing; a batch
    of other submits in the same turn is not held up."""
    n = Node(tmp_path, token=None)
    api, _, pump = n.connect()
    api._reactor = n.reactor
    bad = Deferred.fromCoroutine(api.submit_message(non_utf8_argument()))
    good = Deferred.fromCoroutine(api.submit_message("fine"))
    assert "not valid UTF-8" in failed_with(n.settle(pump, bad), MessageRejected)
    assert isinstance(n.settle(pump, good), str)
    assert len(n.store) == 1


def test_a_message_of_64_kib_is_refused_with_the_size_not_a_traceback(tmp_path: Path) -> None:
    """A 64 KiB message (over AMP's value limit) gives MessageRejected with its size and
    the cluster's limit, from the client, instead of amp.TooLong."""
    n = Node(tmp_path, token=None)
    api, _, pump = n.connect()
    api.max_message_bytes = n.config.max_message_bytes
    d = Deferred.fromCoroutine(api.submit_message("x" * 65536))
    text = failed_with(n.settle(pump, d), MessageRejected)
    assert text == f"message is 65536 bytes, over the limit of {n.config.max_message_bytes}"


def test_blocking_submit_message_refuses_bad_text_at_once() -> None:
    """The blocking submit_message() raises MessageRejected for a non-UTF-8 or oversized
    message before any reactor thread or connection (it used to never return)."""
    from gossip.client.api import submit_message

    with pytest.raises(MessageRejected, match="not valid UTF-8"):
        submit_message(non_utf8_argument(), config="/nonexistent.toml")
    with pytest.raises(MessageRejected, match="over the limit"):
        submit_message("x" * 70_000, config="/nonexistent.toml")


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(dump_config(generate_config(4, name="sec")))
    return path


@pytest.mark.parametrize("value", ["-1", "nan", "0", "inf", "soon"])
def test_gclient_refuses_a_bad_timeout_as_a_usage_error(
    cluster_file: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timeout -1, nan, 0, inf or a word: one line on stderr, exit status 2, and the
    node is never contacted."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(cluster_file), "--id", "1", "--timeout", value, "--list"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--timeout" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (non_utf8_argument(), "not valid UTF-8"),
        ("x" * 65536, "65536 bytes, over the limit of 32768"),
        ("", "message is empty"),
    ],
    ids=["not-utf8", "64KiB", "empty"],
)
def test_gclient_refuses_a_message_no_node_would_take(
    cluster_file: Path, message: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message that is not UTF-8 (bytes from argv), of 64 KiB or empty: one line on
    stderr naming the problem, exit status 1 (refused, as the node would), nothing sent
    (no node runs here: it would otherwise say "not reachable")."""
    code = cli.main(["--config", str(cluster_file), "--id", "1", "--message", message])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and expected in err and "nothing was sent" in err


def test_gclient_refuses_an_unreadable_token_file(
    cluster_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--token-file naming a file that cannot be read: one line, exit status 2."""
    code = cli.main(["--config", str(cluster_file), "--id", "1", "--token-file", "/nope", "--list"])
    assert code == 2
    assert "cannot read the client token" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        ("plain text, ünïcode", "plain text, ünïcode"),
        ("two\nlines", "two\\nlines"),
        ("tab\there\r", "tab\\there\\r"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("bell\x07 del\x7f c1\x9b", "bell\\x07 del\\x7f c1\\x9b"),
        ("line\u2028sep", "line\\u2028sep"),
    ],
)
def test_printable_escapes_what_a_terminal_acts_on(body: str, shown: str) -> None:
    """gclient's escaping: newlines, tabs, carriage returns, ESC and other C0/C1 controls,
    DEL and line separators become escapes, so one message is one line; other text
    (non-ASCII letters included) is unchanged."""
    assert cli.printable(body) == shown
    assert "\n" not in cli.printable(body)
