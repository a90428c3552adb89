"""Fault tests: 16 real node processes, each in its own network namespace, under kills,
pauses, cut-offs, splits and dropped links, with a checker after every heal.

The lab (``gossip.lab``) keeps every packet inside: a bridge in its own namespace,
no route out, every client call made from the lab's client namespace. Where
namespaces cannot be made (not root, no ``ip`` or ``nft``) every test here is
skipped with the reason, never passed.

The scenarios share one 16-node lab (starting 16 nodes costs more than a
scenario); each begins by healing every fault and waiting for every link, and
the checker covers every message acknowledged since the lab started. Each
scenario prints: acknowledged, lost (must be 0), time to converge after the
heal, link flaps after the heal.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from gossip.lab.checker import CheckResult, heal_and_check
from gossip.lab.driver import network_namespace
from gossip.lab.lab import Lab
from gossip.lab.nemesis import run_nemesis
from gossip.lab.netns import Netns, lab_namespaces, sweep_leftovers, unavailable

reactor: Any = _reactor

WHY_NOT = unavailable()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespace lab: {WHY_NOT}"),
]

NODES = 16
# Submits a second to each node while a scenario runs (all nodes: both sides of a split).
RATE = 2.0
# Seconds every acknowledged message has to reach every node after a heal.
DEADLINE = 60.0
# Long enough that links notice (idle_timeout in the lab's cluster file is 5 s).
HOLD = 6.0
NEMESIS_SECONDS = float(os.environ.get("GOSSIP_NEMESIS_SECONDS", "60"))
NEMESIS_SEED = int(os.environ.get("GOSSIP_NEMESIS_SEED", "9"))


@pytest_twisted.async_yield_fixture(scope="module")
async def lab16(tmp_path_factory: pytest.TempPathFactory) -> Any:
    lab = Lab(reactor, tmp_path_factory.mktemp("netns-lab"), NODES)
    try:
        await lab.start()
        yield lab
    finally:
        await lab.stop()


@pytest_twisted.async_yield_fixture
async def lab(lab16: Lab) -> Any:
    """The shared lab, healed, every link up, under load; the load stops afterwards."""
    if lab16.torn_down:
        pytest.exit("the netns lab was torn down (interrupted)", returncode=2)
    lab16.heal()
    ready = await lab16.wait_links(lab16.ids, up=True, timeout=DEADLINE)
    assert ready["done"], f"lab not healthy before the scenario: {ready['pending']}"
    await lab16.load(RATE)
    await lab16.sleep(1.0)
    try:
        yield lab16
    finally:
        await lab16.load(0)


@pytest.fixture
def show(capsys: pytest.CaptureFixture[str]) -> Any:
    def write(text: str) -> None:
        with capsys.disabled():
            print(f"\n  {text}", flush=True)

    return write


def assert_clean(result: CheckResult, show: Any) -> None:
    show(result.line())
    assert not result.problems(), "; ".join(result.problems())
    assert result.acknowledged > 0


# The dynamic overlay's lab: a neighbour silent this long is replaced.
REPLACE_AFTER = 3.0


@pytest_twisted.ensureDeferred
async def test_all_three_neighbours_of_a_node_killed_dynamic_overlay(
    tmp_path: Path, show: Any
) -> None:
    """Dynamic overlay (its own 16-node lab, run before the shared static one starts):
    kill -9 of all three neighbours of node 1, for longer than replace_after. Node 1
    links to three other nodes and keeps receiving: every message the 13 survivors
    acknowledge reaches every survivor, node 1 included, while the three are down.
    After they return, the checker passes as in every scenario."""
    lab = Lab(reactor, tmp_path, NODES, settings={"overlay": "dynamic", "replace_after": 3.0})
    try:
        await lab.start()
        x = 1
        victims = list(lab.config.nodes[x].neighbours)
        survivors = [n for n in lab.ids if n not in victims]
        # The victims take no submits: what they alone acknowledged could not be anywhere.
        await lab.load(RATE, nodes=survivors)
        await lab.sleep(1.0)
        before = await lab.links()
        await lab.kill(victims)
        killed_at = time.monotonic()
        await lab.sleep(REPLACE_AFTER + 4.0)
        links = await lab.links()
        new = sorted(p for (n, p), lc in links.items() if n == x and lc.up)
        show(
            f"dynamic: node {x}'s neighbours {victims} killed; {time.monotonic() - killed_at:.1f} s"
            f" later node {x} has links up to {new}"
        )
        assert len(new) >= 3 and not set(new) & set(victims), new
        r = await lab.request("converge", nodes=survivors, deadline=DEADLINE)
        show(
            f"dynamic, while the three are down: acknowledged {r['acknowledged']},"
            f" lost {r['lost']}, survivors converged"
            f" {r['converged_at'] - killed_at:.1f} s after the kill"
        )
        assert r["converged"] and not r["lost"], r["missing_by_node"]
        result = await heal_and_check(
            lab, f"dynamic: node {x}'s neighbours {victims} killed and restarted", before, DEADLINE
        )
        assert_clean(result, show)
    finally:
        await lab.stop()


def test_lab_keeps_traffic_inside(lab16: Lab) -> None:
    """No lab namespace has a default route, the bridge's namespace has no address, the
    root namespace holds no lab address, and the client driver refuses to run in
    the namespace of the process that starts it."""
    netns = lab16.netns
    members = {netns.node_ns(n): netns.address(n) for n in netns.nodes}
    members[netns.client_ns] = netns.client_address
    for ns in [*members, netns.bridge_ns]:
        assert not [r for r in netns.routes(ns) if r.startswith("default")], ns
    assert netns.addresses(netns.bridge_ns) == []
    for ns, address in members.items():
        assert netns.addresses(ns) == ["127.0.0.1/8", f"{address}/24"], ns
    root = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    assert "10.77.0." not in root.stdout
    refused = subprocess.run(
        [
            *(sys.executable, "-m", "gossip.lab.driver", "--config", str(lab16.config_path)),
            *("--outside", str(network_namespace())),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "refusing" in refused.stderr


def test_leftover_namespaces_of_a_dead_run_are_swept() -> None:
    """Namespaces whose owning process is gone (a run killed before teardown) are
    removed by the next lab; a live run's lab is left alone."""
    child = subprocess.Popen(["true"])
    child.wait()
    leftover = Netns(1, tag=f"{child.pid}x0000")
    live = Netns(1)
    try:
        leftover.create()
        live.create()
        removed = sweep_leftovers()
        names = lab_namespaces()
        assert leftover.bridge_ns in removed and leftover.node_ns(1) not in names
        assert live.bridge_ns in names and live.node_ns(1) in names
    finally:
        leftover.destroy()
        live.destroy()


@pytest_twisted.ensureDeferred
async def test_teardown_removes_namespaces_and_processes(tmp_path: Path) -> None:
    """Stopping a lab ends its node and driver processes and deletes every namespace,
    also when it stops in the middle of a fault (a paused node, a cut)."""
    small = Lab(reactor, tmp_path, 4)
    try:
        await small.start()
        pids = [p.pid for p in small.nodes.values()]
        small.pause([1])
        small.cut(2)
    finally:
        await small.stop()
    assert all(not p.running for p in small.nodes.values())
    assert not [n for n in lab_namespaces() if small.netns.tag in n]
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest_twisted.ensureDeferred
async def test_one_node_killed_and_restarted_under_submits(lab: Lab, show: Any) -> None:
    """kill -9 of one node while every node takes submits, restarted after a while:
    every acknowledged message reaches every node, none twice, no other exit."""
    before = await lab.links()
    await lab.kill([5])
    assert lab.nodes[5].exit_code == -9
    await lab.sleep(HOLD)
    result = await heal_and_check(lab, "node 5 killed and restarted", before, DEADLINE)
    assert_clean(result, show)


@pytest_twisted.ensureDeferred
async def test_one_node_cut_off_with_submits_on_both_sides(lab: Lab, show: Any) -> None:
    """One node cut off from every other (clients still reach it), submits on both sides;
    after the heal both sides hold everything acknowledged on either."""
    before = await lab.links()
    lab.cut(9)
    down = await lab.wait_links([9], up=False, timeout=30)
    assert down["done"], f"node 9's links did not notice the cut: {down['pending']}"
    await lab.sleep(2.0)
    result = await heal_and_check(lab, "node 9 cut off and healed", before, DEADLINE)
    assert_clean(result, show)


@pytest_twisted.ensureDeferred
async def test_cluster_split_in_halves_with_submits_on_both_sides(lab: Lab, show: Any) -> None:
    """The cluster split in two halves (nodes 1-8 | 9-16), submits on both; after the heal
    every node holds what either half acknowledged."""
    left, right = lab.ids[: NODES // 2], lab.ids[NODES // 2 :]
    before = await lab.links()
    lab.split(left, right)
    down = await lab.wait_links(left, up=False, timeout=30, peers=right)
    assert down["done"], f"links across the split did not notice it: {down['pending']}"
    await lab.sleep(2.0)
    result = await heal_and_check(lab, "split 1-8 | 9-16 and healed", before, DEADLINE)
    assert_clean(result, show)


@pytest_twisted.ensureDeferred
async def test_four_of_sixteen_killed_and_brought_back(lab: Lab, show: Any) -> None:
    """kill -9 of 4 of the 16 nodes at once under submits, all 4 restarted later."""
    victims = [2, 7, 11, 14]
    before = await lab.links()
    await lab.kill(victims)
    await lab.sleep(HOLD)
    result = await heal_and_check(lab, f"nodes {victims} killed and restarted", before, DEADLINE)
    assert_clean(result, show)


@pytest_twisted.ensureDeferred
async def test_random_nemesis(lab: Lab, show: Any) -> None:
    """Random faults (kill -9, SIGSTOP, cut, split, dropped link), one at a time under
    submits, for GOSSIP_NEMESIS_SECONDS (60); the checker passes after every heal."""
    show(f"nemesis: seed {NEMESIS_SEED}, {NEMESIS_SECONDS:g} s")
    failures: list[str] = []

    def on_round(what: str, result: CheckResult) -> None:
        show(result.line())
        failures.extend(f"{result.label}: {p}" for p in result.problems())

    start = time.monotonic()
    results = await run_nemesis(
        lab, NEMESIS_SECONDS, random.Random(NEMESIS_SEED), on_round, DEADLINE
    )
    show(f"nemesis: {len(results)} heals in {time.monotonic() - start:.0f} s")
    assert results and not failures, "; ".join(failures)
