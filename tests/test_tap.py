"""How a node is composed and started: tap.makeService, gossip-node, twistd gossip.

Composition and listening are checked on a MemoryReactorClock (nothing binds);
a port in use is checked for real on loopback with the two commands users run;
an IPv6 node pair runs on ::1 when the machine has it.
"""

from __future__ import annotations

import gc
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from clusterlib import wait_for
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from gossip import settings
from gossip.client.api import GossipClient
from gossip.cluster import free_port_base, twistd_command
from gossip.config import dump_config, parse_config
from gossip.gc_thresholds import YOUNG_THRESHOLD
from gossip.node import TICK_SECONDS, GossipNode, StartupError
from gossip.store.memory import MemoryStore
from gossip.tap import ListenService, Options, makeService, node_services, run_node, version
from gossip.topology import generate_config


def options(config_path: Path, node_id: int = 2, *extra: str) -> Options:
    opts = Options()
    opts.parseOptions(["--id", str(node_id), "--config", str(config_path), "--memory", *extra])
    return opts


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(dump_config(generate_config(4, base_peer_port=21000)))
    return path


def test_a_node_process_collects_young_garbage_less_often(cluster_file: Path) -> None:
    """makeService (twistd) sets the collector's young threshold to
    ``YOUNG_THRESHOLD`` for the process, keeping the older generations' ratios: the
    default 700 costs a loaded node about 5% of its CPU (gossip.gc_thresholds)."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        makeService(options(cluster_file), MemoryReactorClock())
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_make_service_is_a_multiservice_of_ports_node_and_ticks(cluster_file: Path) -> None:
    """makeService returns a MultiService: the node, a TimerService ticking it, and a
    StreamServerEndpointService per port that listens in privilegedStartService on
    the node's peer_listen and client_listen."""
    reactor = MemoryReactorClock()
    top = makeService(options(cluster_file), reactor)
    assert isinstance(top, MultiService)
    children = {s.name: s for s in top}
    assert list(children) == ["node", "tick", "peer-port", "client-port"]
    assert isinstance(children["node"], GossipNode)
    tick = children["tick"]
    assert isinstance(tick, TimerService) and tick.step == TICK_SECONDS and tick.clock is reactor
    for name in ("peer-port", "client-port"):
        assert isinstance(children[name], StreamServerEndpointService)
    top.privilegedStartService()
    listened = [(port, interface) for port, _, _, interface in reactor.tcpServers]
    assert listened == [(21002, "127.0.0.1"), (21102, "127.0.0.1")]
    top.startService()
    assert children["node"].running
    top.stopService()
    assert not children["node"].running
    assert not tick.running


def test_listen_descriptions_come_from_the_cluster_file(tmp_path: Path) -> None:
    """Explicit peer_listen/client_listen are what the services listen on (tcp6 included)."""
    text = dump_config(generate_config(4, base_peer_port=21000)).replace(
        "id = 2\n",
        'id = 2\npeer_listen = "tcp6:7001:interface=\\\\:\\\\:1"\n'
        'client_listen = "tcp:7101:interface=0.0.0.0"\n',
    )
    path = tmp_path / "c.toml"
    path.write_text(text)
    reactor = MemoryReactorClock()
    makeService(options(path), reactor).privilegedStartService()
    listened = [(port, interface) for port, _, _, interface in reactor.tcpServers]
    assert listened == [(7001, "::1"), (7101, "0.0.0.0")]


class BusyReactor(MemoryReactorClock):
    """A MemoryReactorClock on which one port is already taken."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy
        self.stopped: list[int] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port == self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        listening = super().listenTCP(port, factory, backlog, interface)
        original = listening.stopListening

        def stop() -> Any:
            self.stopped.append(port)
            return original()

        listening.stopListening = stop
        return listening


def test_port_in_use_is_one_startup_error_and_frees_the_other_port() -> None:
    """A client port in use: StartupError naming the node, the setting and the
    description with the OS's words; the peer port that did listen is closed again."""
    config = generate_config(4, base_peer_port=21000)
    reactor = BusyReactor(21102)
    node = GossipNode(config, 2, MemoryStore(), reactor)
    top = node_services(node, reactor)
    with pytest.raises(StartupError) as info:
        top.privilegedStartService()
    assert str(info.value) == (
        "node 2 cannot listen on client_listen tcp:21102:interface=127.0.0.1:"
        " Address already in use"
    )
    assert reactor.stopped == [21002]


def test_a_listen_that_fails_later_goes_to_on_fatal() -> None:
    """An endpoint whose listen fails asynchronously is not logged and forgotten (as
    StreamServerEndpointService does by default): on_fatal gets one line."""
    from twisted.internet.defer import Deferred

    class LateEndpoint:
        def __init__(self) -> None:
            self.d: Deferred[Any] = Deferred()

        def listen(self, factory: Any) -> Deferred[Any]:
            return self.d

    lines: list[str] = []
    endpoint = LateEndpoint()
    service = ListenService(endpoint, None, "peer_listen systemd:domain=INET:index=0", lines.append)
    service.privilegedStartService()
    endpoint.d.errback(CannotListenError("", 7001, OSError(98, "Address already in use")))
    assert lines == [
        "cannot listen on peer_listen systemd:domain=INET:index=0: Address already in use"
    ]


def _busy_port() -> tuple[socket.socket, int]:
    base = free_port_base(1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", base))
    s.listen()
    return s, base


def _file_with_peer_port(tmp_path: Path, port: int) -> Path:
    config = generate_config(4, base_peer_port=port - 2, base_client_port=free_port_base(5))
    assert config.node(2).peer_port == port
    path = tmp_path / "cluster.toml"
    path.write_text(dump_config(config))
    return path


def test_gossip_node_with_its_port_in_use_says_one_line_and_exits_1(tmp_path: Path) -> None:
    """gossip-node on a taken peer port: exit status 1, one line on stderr naming the
    port, nothing on stdout, no traceback."""
    sock, port = _busy_port()
    with sock:
        path = _file_with_peer_port(tmp_path, port)
        code = "from gossip.tap import run_node; raise SystemExit(run_node())"
        r = subprocess.run(
            [sys.executable, "-c", code, "--id", "2", "--config", str(path), "--memory"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == (
        f"gossip-node: node 2 cannot listen on peer_listen tcp:{port}:interface=127.0.0.1:"
        " Address already in use\n"
    )


def test_twistd_gossip_with_its_port_in_use_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    """twistd -n gossip on a taken peer port exits non-zero; the reason is one line
    naming the port (twistd logs it), with no traceback."""
    sock, port = _busy_port()
    with sock:
        path = _file_with_peer_port(tmp_path, port)
        node_args = ["--id", "2", "--config", str(path), "--memory"]
        r = subprocess.run(
            [*twistd_command(), "-n", "--pidfile=", "gossip", *node_args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert r.returncode != 0
    output = r.stdout + r.stderr
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1 and f"tcp:{port}:interface=127.0.0.1" in lines[0], output
    assert "Address already in use" in lines[0]
    assert "Traceback" not in output


def test_version_is_the_installed_projects(capsys: pytest.CaptureFixture[str]) -> None:
    """gossip-node --version and twistd gossip --version print importlib.metadata's version."""
    from importlib import metadata

    assert version() == metadata.version("gossip")
    assert run_node(["--version"]) == 0
    assert capsys.readouterr().out == f"gossip {version()}\n"
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"gossip {version()}\n"


def test_fsync_flag_help_comes_from_the_settings_table() -> None:
    """--fsync's help is the fsync setting's doc and choices."""
    help_row = next(p for p in Options.optParameters if p[0] == "fsync")
    assert help_row[3] == settings.FSYNC.help()
    assert "always, batch, never" in help_row[3]


def _has_ipv6_loopback() -> str:
    """'' if ::1 can be bound here, else why not."""
    if not socket.has_ipv6:
        return "Python has no IPv6 support"
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"cannot bind ::1: {e}"
    return ""


@pytest.mark.skipif(bool(_has_ipv6_loopback()), reason=_has_ipv6_loopback() or "has ::1")
@pytest_twisted.ensureDeferred
async def test_two_nodes_on_ipv6_loopback_link_and_gossip() -> None:
    """Two nodes whose host is "::1" listen with tcp6, dial each other, and a message
    submitted to one (the client dials node 1's IPv6 client_address) reaches the other."""
    from twisted.internet import reactor

    base = free_port_base(4)
    text = (
        '[cluster]\nname = "v6"\nallow_any_degree = true\n'
        f'[[node]]\nid = 1\nhost = "::1"\npeer_port = {base}\nclient_port = {base + 1}\n'
        "neighbours = [2]\n"
        f'[[node]]\nid = 2\nhost = "::1"\npeer_port = {base + 2}\nclient_port = {base + 3}\n'
        "neighbours = [1]\n"
    )
    config = parse_config(text)
    assert config.node(1).peer_listen.startswith("tcp6:")
    services = []
    for node_id in (1, 2):
        top = node_services(GossipNode(config, node_id, MemoryStore(), reactor), reactor)
        top.privilegedStartService()
        top.startService()
        services.append(top)
    clients: list[GossipClient] = []
    try:
        one = await GossipClient.connect_node(reactor, 1, config)
        clients.append(one)
        assert "\\:\\:1" in one.address
        await one.submit_message("over IPv6")
        two = await GossipClient.connect_node(reactor, 2, config)
        clients.append(two)

        async def arrived() -> bool:
            return "over IPv6" in await two.get_messages()

        await wait_for(reactor, arrived, 10, "the message on node 2")
        status = await two.status()
        assert [link["state"] for link in status["links"]] == ["up"]
    finally:
        for c in clients:
            c.close()
        for top in services:
            await top.stopService()


def _no_delay(transport: Any) -> bool:
    sock = transport.getHandle()
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest_twisted.ensureDeferred
async def test_peer_and_client_connections_send_without_nagle() -> None:
    """Every connection a node uses sets TCP_NODELAY, both ends: peer links (dialed
    and accepted), the node's client connections and the client's own. With Nagle's
    algorithm a small frame written while an earlier one is unacknowledged waits for
    that acknowledgement (up to the peer's delayed-ACK time, tens of ms): at a low
    message rate every hop and every answer would pay it."""
    from twisted.internet import reactor

    base = free_port_base(4)
    text = (
        '[cluster]\nname = "nodelay"\nallow_any_degree = true\n'
        f'[[node]]\nid = 1\nhost = "127.0.0.1"\npeer_port = {base}\nclient_port = {base + 1}\n'
        "neighbours = [2]\n"
        f'[[node]]\nid = 2\nhost = "127.0.0.1"\npeer_port = {base + 2}\n'
        f"client_port = {base + 3}\nneighbours = [1]\n"
    )
    config = parse_config(text)
    nodes = [GossipNode(config, node_id, MemoryStore(), reactor) for node_id in (1, 2)]
    services = [node_services(node, reactor) for node in nodes]
    for top in services:
        top.privilegedStartService()
        top.startService()
    client: GossipClient | None = None
    try:

        async def linked() -> bool:
            return all(s.state == "up" for n in nodes for s in n.links.status())

        await wait_for(reactor, linked, 10, "the link up on both nodes", 0.01)
        # The connection each link kept: one end dialed, the other accepted (a second
        # connection, when both dialed at once, is being closed and is not looked at).
        kept = [link.proto for n in nodes for link in n.links.links.values()]
        assert all(p is not None for p in kept)
        assert {p.outbound for p in kept if p is not None} == {True, False}
        peer_transports = [p.transport for p in kept if p is not None]
        client = await GossipClient.connect_node(reactor, 1, config)
        await client.watch(lambda start, ids: None)
        (served,) = nodes[0].following
        assert all(_no_delay(t) for t in peer_transports)
        assert _no_delay(served.transport)
        assert _no_delay(client.proto.transport)
    finally:
        if client is not None:
            client.close()
        for top in services:
            await top.stopService()
