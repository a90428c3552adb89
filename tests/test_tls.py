"""Mutual TLS on peer links, with real TLS over loopback (ports 29000-29999).

Three nodes (1, 2, 3: a triangle) run in this process on the real reactor, each
with its peer port behind Twisted's TLS and a certificate from the cluster CA
made by ``gossip.certs``. Strangers dial node 1 as an attacker would: with a
certificate from another CA, with a valid certificate of one node claiming
another id, with an expired or not yet valid certificate, or without TLS. Each
sends a ``Hello`` naming node 2 and then a ``Gossip`` frame with a message of
its own. Every one is refused with one log line saying why, the links between
the honest nodes stay up (never replaced), their messages still spread, and no
node stores anything a stranger sent.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from OpenSSL import crypto
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from gossip import certs
from gossip.cluster import ports_free
from gossip.config import load_config
from gossip.core.frames import Envelope, GossipFrame
from gossip.core.message import message_id
from gossip.net.links import REFUSED, UP
from gossip.node import GossipNode, StartupError, frame_limit
from gossip.store.memory import MemoryStore
from gossip.tap import node_services
from gossip.wire import codec

CLUSTER = "tlstest"
NODES = (1, 2, 3)
DEADLINE = 15.0  # seconds any wait in these tests may take


# -- certificates ------------------------------------------------------------------


def pem_cert(path: Path, cert: x509.Certificate) -> None:
    certs.write_certs(path, [cert])


def make_pki(directory: Path) -> certs.CertDir:
    """The cluster CA and certificates for nodes 1-4 (4 runs nowhere: an extra valid one)."""
    pki = certs.CertDir(directory)
    pki.init_ca(CLUSTER, 30)
    for n in (1, 2, 3, 4):
        pki.issue_node(n, ["127.0.0.1"], 30)
    return pki


def stranger_files(
    directory: Path,
    name: str,
    node_id: int,
    ca: tuple[certs.PrivateKey, x509.Certificate],
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    key, cert = certs.issue(
        ca[0],
        ca[1],
        common_name=f"gossip node {node_id}",
        uri=certs.node_uri(node_id),
        hosts=["127.0.0.1"],
        not_before=not_before,
        not_after=not_after,
    )
    certs.write_key(directory / f"{name}.key", key)
    pem_cert(directory / f"{name}.crt", cert)
    return directory / f"{name}.crt", directory / f"{name}.key"


# -- ports and the cluster ------------------------------------------------------------


def port_block(count: int) -> int:
    """A base port in 29000-29999 with ``count`` free loopback ports from it."""
    for base in range(29000, 30000 - count, count):
        if ports_free(base, count):
            return base
    raise RuntimeError("no free block of ports in 29000-29999")


def cluster_text(base: int, tls: bool = True, extra: str = "", node_extra: str = "") -> str:
    lines = [
        "[cluster]",
        f'name = "{CLUSTER}"',
        "allow_any_degree = true",
        "reconnect_max_delay = 0.5",
        f"tls = {'true' if tls else 'false'}",
        extra,
    ]
    for n in NODES:
        lines += [
            "[[node]]",
            f"id = {n}",
            'host = "127.0.0.1"',
            f"peer_port = {base + n}",
            f"client_port = {base + 10 + n}",
            f"neighbours = {[m for m in NODES if m != n]}",
            node_extra.replace("{n}", str(n)),
        ]
    return "\n".join(lines) + "\n"


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def lines(self, level: LogLevel | None = None) -> list[str]:
        return [formatEvent(e) for e in self.events if level is None or e.get("log_level") == level]

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines() if text in line)


@pytest.fixture
def log() -> Iterator[LogCapture]:
    cap = LogCapture()
    globalLogPublisher.addObserver(cap)
    yield cap
    globalLogPublisher.removeObserver(cap)


class Cluster:
    def __init__(self, path: Path, start: tuple[int, ...] = NODES) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.config = load_config(path)
        self.nodes: dict[int, GossipNode] = {}
        self.services: list[Any] = []
        for n in start:
            node = GossipNode(self.config, n, MemoryStore(), reactor)
            top = node_services(node, reactor)
            top.privilegedStartService()
            top.startService()
            self.nodes[n] = node
            self.services.append(top)

    def port(self, n: int) -> int:
        port = self.config.node(n).peer_port
        assert port is not None
        return port

    async def stop(self) -> None:
        for top in self.services:
            await top.stopService()

    async def wait(self, check: Any, what: str) -> None:
        deadline = self.reactor.seconds() + DEADLINE
        while not check():
            if self.reactor.seconds() > deadline:
                raise AssertionError(f"timed out after {DEADLINE:g} s waiting for {what}")
            await task.deferLater(self.reactor, 0.05)

    def all_up(self) -> bool:
        return all(
            link.state == UP for node in self.nodes.values() for link in node.links.links.values()
        )

    def times_up(self) -> dict[tuple[int, int], int]:
        return {
            (n, link.peer): link.times_up
            for n, node in self.nodes.items()
            for link in node.links.links.values()
        }

    async def spreads(self, body: bytes) -> None:
        """``body`` submitted to node 1 reaches every running node."""
        mid, _ = await self.nodes[1].submit(body)
        await self.wait(
            lambda: all(mid in node.store for node in self.nodes.values()),
            f"{body!r} on every node",
        )

    def holds(self, mid: bytes) -> list[int]:
        return [n for n, node in self.nodes.items() if mid in node.store]


@pytest.fixture
def pki(tmp_path: Path) -> certs.CertDir:
    return make_pki(tmp_path / "tls")


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Path, pki: certs.CertDir) -> AsyncIterator[Cluster]:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_text(port_block(20)))  # the default tls_* paths: tls/ beside it
    c = Cluster(path)
    try:
        await c.wait(c.all_up, "every link up")
        yield c
    finally:
        await c.stop()


# -- a stranger on the wire -----------------------------------------------------------


EVIL = b"planted by a stranger"


class Stranger(Int32StringReceiver):
    """Dials, says it is node ``claims``, sends a message of its own, records answers."""

    MAX_LENGTH = frame_limit(32768)

    def __init__(self, claims: int) -> None:
        self.claims = claims
        self.answers: list[codec.AnyFrame | bytes] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.sendString(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, CLUSTER, self.claims, 7)))
        frame = GossipFrame((Envelope(message_id(EVIL), EVIL, (self.claims,)),))
        self.sendString(codec.encode(frame))

    def stringReceived(self, data: bytes) -> None:
        try:
            self.answers.append(codec.decode(data))
        except codec.BadFrame:
            self.answers.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.reason = reason
        self.lost.callback(None)


def options_for(cert: Path, key: Path, trust: Path) -> CertificateOptions:
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(certs.load_key(key)),
        certificate=crypto.X509.from_cryptography(certs.load_certificates(cert)[0]),
        trustRoot=trustRootFromCertificates(
            [Certificate(crypto.X509.from_cryptography(c)) for c in certs.load_certificates(trust)]
        ),
    )


async def stranger_dials(
    cluster: Cluster, options: CertificateOptions | None, claims: int = 2, port: int = 0
) -> Stranger:
    """A stranger dials node 1 (TLS with ``options``, or plain TCP); returns once the
    node has closed the connection."""
    endpoint: Any = TCP4ClientEndpoint(cluster.reactor, "127.0.0.1", port or cluster.port(1))
    if options is not None:
        endpoint = wrapClientTLS(options, endpoint)
    stranger = Stranger(claims)
    await connectProtocol(endpoint, stranger)
    lost = stranger.lost
    lost.addTimeout(DEADLINE, cluster.reactor)
    await lost
    return stranger


def assert_unharmed(cluster: Cluster, before: dict[tuple[int, int], int]) -> None:
    """No node holds the stranger's message and no link was replaced or dropped."""
    assert cluster.holds(message_id(EVIL)) == []
    assert cluster.all_up()
    assert cluster.times_up() == before


# -- the tests ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nodes_link_over_mutual_tls_and_gossip(cluster: Cluster) -> None:
    """Three nodes with certificates from one CA link over TLS and a message spreads;
    each connection's peer certificate is the node the link is for."""
    await cluster.spreads(b"over TLS")
    for n, node in cluster.nodes.items():
        for peer, link in node.links.links.items():
            assert link.proto is not None
            cert = link.proto.transport.getPeerCertificate()  # type: ignore[union-attr]
            assert certs.node_id_of(cert.to_cryptography()) == peer, (n, peer)


@pytest_twisted.ensureDeferred
async def test_certificate_from_another_ca_is_refused(
    cluster: Cluster, tmp_path: Path, pki: certs.CertDir, log: LogCapture
) -> None:
    """A stranger whose certificate (for node 2) is signed by another CA fails the TLS
    handshake: node 1 logs one line saying the certificate is not from its CAs, the
    stranger never gets a Hello, and nothing it sent is stored anywhere."""
    before = cluster.times_up()
    other = certs.make_ca("other")
    cert, key = stranger_files(tmp_path, "other-ca-node-2", 2, other)
    stranger = await stranger_dials(cluster, options_for(cert, key, pki.bundle))
    assert stranger.answers == []
    lines = [line for line in log.lines(LogLevel.warn) if "TLS handshake" in line]
    assert len(lines) == 1, lines
    assert "unidentified peer (inbound 127.0.0.1" in lines[0]
    assert "not signed by a CA of tls_ca" in lines[0]
    await cluster.spreads(b"after a foreign CA")
    assert_unharmed(cluster, before)


@pytest_twisted.ensureDeferred
async def test_valid_certificate_of_one_node_claiming_another_is_refused(
    cluster: Cluster, pki: certs.CertDir, log: LogCapture
) -> None:
    """A stranger with node 4's genuine certificate (and key) that says "node 2" in its
    Hello is refused with one line naming both ids; it gets only the generic Reject, and
    node 1's link to the real node 2 stays as it was."""
    before = cluster.times_up()
    stranger = await stranger_dials(
        cluster, options_for(pki.path / "node-4.crt", pki.path / "node-4.key", pki.bundle)
    )
    assert stranger.answers == [codec.Reject(REFUSED)]
    lines = [line for line in log.lines(LogLevel.warn) if "handshake refused" in line]
    assert len(lines) == 1, lines
    assert "its certificate is node 4's but its Hello claims node 2" in lines[0]
    await cluster.spreads(b"after an impostor")
    assert_unharmed(cluster, before)


@pytest_twisted.ensureDeferred
async def test_node_taking_over_a_live_neighbours_id_with_its_own_certificate_is_refused(
    cluster: Cluster, pki: certs.CertDir, log: LogCapture
) -> None:
    """Node 3's own certificate does not let it speak as node 2 either: the Hello's id
    must be the certificate's, whoever holds it."""
    before = cluster.times_up()
    stranger = await stranger_dials(
        cluster, options_for(pki.path / "node-3.crt", pki.path / "node-3.key", pki.bundle)
    )
    assert all(isinstance(a, codec.Reject) for a in stranger.answers)
    assert log.count("its certificate is node 3's but its Hello claims node 2") == 1
    assert_unharmed(cluster, before)


@pytest.mark.parametrize(
    ("when", "why"),
    [
        ("expired", "it has expired"),
        ("not yet valid", "it is not valid yet"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_expired_or_not_yet_valid_certificate_is_refused(
    cluster: Cluster, tmp_path: Path, pki: certs.CertDir, log: LogCapture, when: str, why: str
) -> None:
    """A certificate from the cluster CA for node 2 that has expired (or starts
    tomorrow) fails the handshake with one line saying which."""
    before = cluster.times_up()
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    start, end = (now - 3 * day, now - day) if when == "expired" else (now + day, now + 3 * day)
    cert, key = stranger_files(tmp_path, "dated", 2, pki.ca(), start, end)
    stranger = await stranger_dials(cluster, options_for(cert, key, pki.bundle))
    assert stranger.answers == []
    lines = [line for line in log.lines(LogLevel.warn) if "TLS handshake" in line]
    assert len(lines) == 1 and why in lines[0], lines
    assert_unharmed(cluster, before)


@pytest_twisted.ensureDeferred
async def test_plain_tcp_dialer_on_a_tls_port_is_refused(cluster: Cluster, log: LogCapture) -> None:
    """A dialer without TLS that sends a Hello and a Gossip frame in the clear gets no
    answer it can read; node 1 logs that the peer does not speak TLS."""
    before = cluster.times_up()
    stranger = await stranger_dials(cluster, None)
    assert stranger.answers == []
    lines = [line for line in log.lines(LogLevel.warn) if "TLS handshake" in line]
    assert len(lines) == 1 and "does not speak TLS" in lines[0], lines
    await cluster.spreads(b"after a plain dialer")
    assert_unharmed(cluster, before)


@pytest_twisted.ensureDeferred
async def test_dialing_an_impostor_at_a_neighbours_address_is_refused(
    tmp_path: Path, pki: certs.CertDir, log: LogCapture
) -> None:
    """Node 1 dials node 2's address, where an impostor listens with node 4's valid
    certificate and answers "node 2": node 1 refuses it (the certificate is node 4's),
    keeps the link down and says why in its log and the link's last error."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory

    base = port_block(20)
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_text(base))

    class Impostor(Int32StringReceiver):
        def stringReceived(self, data: bytes) -> None:
            if isinstance(codec.decode(data), codec.Hello):
                self.sendString(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, CLUSTER, 2, 5)))
                frame = GossipFrame((Envelope(message_id(EVIL), EVIL, (2,)),))
                self.sendString(codec.encode(frame))

    options = options_for(pki.path / "node-4.crt", pki.path / "node-4.key", pki.bundle)
    port = await TCP4ServerEndpoint(reactor, base + 2, interface="127.0.0.1").listen(
        TLSMemoryBIOFactory(options, False, Factory.forProtocol(Impostor))
    )
    c = Cluster(path, start=(1,))
    try:
        text = "its certificate is node 4's but its Hello claims node 2"
        await c.wait(lambda: log.count(text) >= 1, "node 1 to refuse the impostor")
        link = c.nodes[1].links.links[2]
        assert link.state != UP and link.times_up == 0
        assert c.holds(message_id(EVIL)) == []
    finally:
        await c.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ca_rotation_old_and_new_certificates_link_while_both_are_trusted(
    tmp_path: Path, log: LogCapture
) -> None:
    """During a rotation window (ca-bundle.crt trusts the old and the new CA) node 3,
    re-issued by the new CA, links with nodes 1 and 2 that still hold old-CA
    certificates; after 'retire' a node with an old certificate no longer starts."""
    pki = make_pki(tmp_path / "tls")
    pki.rotate(CLUSTER, 30)
    pki.issue_node(3, ["127.0.0.1"], 30)
    new_ca = pki.ca()[1]
    assert len(pki.trusted()) == 2
    node3 = certs.load_certificates(pki.path / "node-3.crt")[0]
    node1 = certs.load_certificates(pki.path / "node-1.crt")[0]
    assert node3.issuer == new_ca.subject and node1.issuer != new_ca.subject
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_text(port_block(20)))
    c = Cluster(path)
    try:
        await c.wait(c.all_up, "every link up across old and new CA")
        await c.spreads(b"mid-rotation")
    finally:
        await c.stop()
    pki.retire()
    with pytest.raises(StartupError, match=r"node-1\.crt: not signed by a CA of"):
        GossipNode(load_config(path), 1, MemoryStore(), c.reactor)


@pytest_twisted.ensureDeferred
async def test_new_ca_certificate_is_refused_by_a_node_that_trusts_only_the_old_one(
    tmp_path: Path, log: LogCapture
) -> None:
    """Before the bundle reaches a node, a peer re-issued by the new CA is refused by it:
    the rotation order (bundle first, then certificates) matters, and the log says so."""
    pki = make_pki(tmp_path / "tls")
    old_bundle = pki.bundle.read_bytes()
    pki.rotate(CLUSTER, 30)
    pki.issue_node(3, ["127.0.0.1"], 30)
    # Nodes 1 and 2 still trust only the old CA; node 3 trusts both.
    (tmp_path / "tls" / "old-bundle.crt").write_bytes(old_bundle)
    base = port_block(20)
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_text(base))
    old_path = tmp_path / "old.toml"
    old_path.write_text(cluster_text(base, extra='tls_ca = "tls/old-bundle.crt"'))
    from twisted.internet import reactor

    services = []
    nodes = {}
    for n, p in ((1, old_path), (2, old_path), (3, path)):
        node = GossipNode(load_config(p), n, MemoryStore(), reactor)
        top = node_services(node, reactor)
        top.privilegedStartService()
        top.startService()
        services.append(top)
        nodes[n] = node
    try:
        deadline = reactor.seconds() + DEADLINE
        while not (
            nodes[1].links.links[2].state == UP and log.count("not signed by a CA of tls_ca") >= 1
        ):
            assert reactor.seconds() < deadline, log.lines(LogLevel.warn)
            await task.deferLater(reactor, 0.05)
        assert nodes[1].links.links[3].times_up == 0
        assert nodes[3].links.links[1].times_up == 0
    finally:
        for top in services:
            await top.stopService()


@pytest_twisted.ensureDeferred
async def test_plain_tcp_cluster_warns_once_at_start(tmp_path: Path, log: LogCapture) -> None:
    """Without cluster.tls the nodes still link over plain TCP (the local development
    cluster), and each node writes exactly one warning that its peer links are not
    encrypted or authenticated."""
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_text(port_block(20), tls=False))
    c = Cluster(path)
    try:
        await c.wait(c.all_up, "every link up")
        await c.spreads(b"in the clear")
        assert log.count("peer links are not encrypted or authenticated") == len(NODES)
    finally:
        await c.stop()


# -- start-up checks of a node's own files ---------------------------------------------


def start_error(tmp_path: Path, node_extra: str = "", extra: str = "") -> str:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_text(29000, extra=extra, node_extra=node_extra))
    from twisted.internet.testing import MemoryReactorClock

    with pytest.raises(StartupError) as e:
        GossipNode(load_config(path), 1, MemoryStore(), MemoryReactorClock())
    return str(e.value)


def test_node_with_unusable_tls_files_does_not_start(tmp_path: Path, pki: certs.CertDir) -> None:
    """A missing file, a certificate of another node, a key of another certificate, or an
    expired certificate stop the start with one line naming the file (every peer would
    refuse the node otherwise)."""
    missing = start_error(tmp_path, extra='tls_ca = "tls/nowhere.crt"')
    assert "tls/nowhere.crt: cannot read the certificate" in missing
    assert "\n" not in missing
    other = start_error(tmp_path, node_extra='tls_cert = "tls/node-2.crt"')
    assert "node-2.crt: the certificate names node 2, not node 1" in other
    mismatch = start_error(
        tmp_path, node_extra='tls_cert = "tls/node-{n}.crt"\ntls_key = "tls/node-4.key"'
    )
    assert "node-4.key: this key does not belong to" in mismatch
    now = datetime.datetime.now(datetime.UTC)
    stranger_files(
        pki.path,
        "old-1",
        1,
        pki.ca(),
        now - datetime.timedelta(days=9),
        now - datetime.timedelta(days=2),
    )
    expired = start_error(
        tmp_path, node_extra='tls_cert = "tls/old-1.crt"\ntls_key = "tls/old-1.key"'
    )
    assert "old-1.crt: expired" in expired
