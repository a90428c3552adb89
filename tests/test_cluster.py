"""A real 16-node cluster: separate processes, real TCP on loopback, started as users do."""

from __future__ import annotations

import random
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from clusterlib import connect_all, gather, message_counts, wait_for, write_cluster
from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue

from gossip.cluster import LocalCluster

reactor: Any = _reactor
pytestmark = pytest.mark.cluster

GCLIENT = str(Path(sys.executable).parent / "gclient")


async def gclient(config: Path, *args: str) -> tuple[int, str, str]:
    out, err, code = await getProcessOutputAndValue(
        GCLIENT, ["--config", str(config), *args], env={"PATH": "/usr/bin:/bin"}
    )
    return code, out.decode(), err.decode()


@pytest_twisted.async_yield_fixture
async def cluster16(tmp_path: Path) -> Any:
    config_path, _ = write_cluster(tmp_path, 16)
    cluster = LocalCluster(reactor, config_path, tmp_path)
    cluster.start_all()
    try:
        await cluster.wait_ready(timeout=90)
        yield cluster
    finally:
        await cluster.stop_all()


@pytest_twisted.ensureDeferred
async def test_200_messages_reach_all_16_nodes(cluster16: LocalCluster) -> None:
    """200 messages submitted at random nodes through the client API: every node lists
    all 200 before the deadline, and a query by id at another node returns the body."""
    rng = random.Random(42)
    clients = await connect_all(cluster16)
    try:
        bodies = [f"message {i} {rng.random()}" for i in range(200)]
        origin = {b: rng.choice(sorted(clients)) for b in bodies}
        ids = await gather(*(clients[origin[b]].submit_message(b) for b in bodies))
        assert len(set(ids)) == 200

        async def all_have_200() -> bool:
            counts = await message_counts(cluster16)
            return all(c == 200 for c in counts.values())

        await wait_for(reactor, all_have_200, 60, "every node to hold 200 messages")
        for n, client in clients.items():
            assert sorted(await client.get_messages()) == sorted(bodies), f"node {n}"
        body = bodies[17]
        other = next(n for n in sorted(clients) if n != origin[body])
        m = await clients[other].get_message(ids[17])
        assert m.body == body
        assert m.path and m.path[0] == origin[body] and m.path[-1] != other
    finally:
        for c in clients.values():
            c.close()


@pytest_twisted.ensureDeferred
async def test_gclient_submit_query_list_and_errors(cluster16: LocalCluster) -> None:
    """gclient prints a short id for --message, the body for --msgID (short id, other
    node), every message for --list; an oversized message and an unknown id give one
    line on stderr and exit status 1; a stopped node gives a one-line error naming the
    node and its address, never a traceback."""
    cfg = cluster16.config_path
    code, out, err = await gclient(cfg, "--id", "1", "--message", "Apple")
    assert code == 0, err
    short = out.strip()
    assert len(short) == 10 and short.isalnum()

    async def node5_has_it() -> bool:
        code, out, _ = await gclient(cfg, "--id", "5", "--msgID", short)
        return code == 0 and out == "Apple\n"

    await wait_for(reactor, node5_has_it, 30, "node 5 to answer Apple")

    code, out, err = await gclient(cfg, "--id", "4", "--list")
    assert code == 0 and out.splitlines() == ["Apple"], (out, err)

    big = "x" * (cluster16.config.max_message_bytes + 1)
    code, out, err = await gclient(cfg, "--id", "2", "--message", big)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "over the limit" in err and "Traceback" not in err

    code, out, err = await gclient(cfg, "--id", "2", "--msgID", "1111111111")
    assert code == 1 and err.count("\n") == 1 and "no message" in err

    await cluster16.stop_node(7)
    spec = cluster16.config.node(7)
    code, out, err = await gclient(cfg, "--id", "7", "--status")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"node 7 at {spec.client_address}" in err


@pytest_twisted.ensureDeferred
async def test_hostile_peer_frames_close_only_that_link(cluster16: LocalCluster) -> None:
    """Garbage, an oversized length prefix and a bad handshake on a node's peer port
    each get that connection closed with a log line; the node keeps its links and
    keeps serving clients and gossip."""
    spec = cluster16.config.node(3)
    payloads = [
        struct.pack(">I", 2**31 - 1) + b"x" * 16,  # oversized frame
        struct.pack(">I", 4) + b"\xff\xff\xff\xff",  # undecodable frame
        struct.pack(">I", 0),  # empty frame of no kind, before any Hello
    ]
    for payload in payloads:
        with socket.create_connection((spec.host, spec.peer_port), timeout=5) as s:
            s.sendall(payload)
            s.settimeout(10)
            while s.recv(4096):  # until the node closes it
                pass

    async def logged() -> bool:
        text = cluster16.log_path(3).read_text()
        return text.count("closing link to unidentified peer") >= len(payloads)

    await wait_for(reactor, logged, 20, "node 3 to log the closed connections")
    status = await cluster16.node_status(3)
    assert status is not None
    assert all(link["state"] == "up" for link in status["links"])
    clients = await connect_all(cluster16)
    try:
        await clients[3].submit_message("still serving")

        async def everywhere() -> bool:
            counts = await message_counts(cluster16)
            return all(c == 1 for c in counts.values())

        await wait_for(reactor, everywhere, 30, "the message from node 3 to reach all")
    finally:
        for c in clients.values():
            c.close()


@pytest_twisted.ensureDeferred
async def test_blocking_python_api_from_a_script(cluster16: LocalCluster) -> None:
    """The blocking ``submit_message`` / ``get_messages`` / ``get_message`` work from a
    plain script (no reactor of its own) against real nodes."""
    script = (
        "import sys, time\n"
        "from gossip.client.api import submit_message, get_messages, get_message\n"
        "cfg = sys.argv[1]\n"
        "mid = submit_message('from a script', node=2, config=cfg)\n"
        "deadline = time.time() + 30\n"
        "while 'from a script' not in get_messages(node=11, config=cfg):\n"
        "    assert time.time() < deadline, 'not delivered'\n"
        "    time.sleep(0.1)\n"
        "print(mid, get_message(mid[:10], node=11, config=cfg).body)\n"
    )
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-c", script, str(cluster16.config_path)], env={"PATH": "/usr/bin:/bin"}
    )
    assert code == 0, err.decode()
    mid, body = out.decode().strip().split(" ", 1)
    assert len(mid) == 22 and body == "from a script"
