"""The fault-test lab's pure parts, which run anywhere (no root, no namespaces): its
cluster file, the flap count, the nemesis' fault order, the driver's route guard and
the soak command's durations."""

from __future__ import annotations

import argparse
import random
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from gossip.config import dump_config, parse_config
from gossip.core.message import id_text, message_id
from gossip.lab.checker import count_flaps
from gossip.lab.driver import Driver, has_route_out
from gossip.lab.lab import CLIENT_PORT, LAB_TIMERS, PEER_PORT, LinkCount, lab_config
from gossip.lab.ledger import Ledger
from gossip.lab.nemesis import FAULTS, fault_order
from gossip.lab.netns import Netns
from gossip.lab.soak import duration, lab_settings, main, parser


def test_lab_cluster_file_puts_each_node_at_its_lab_address() -> None:
    """Node i is at 10.77.0.i with the lab's ports and short timers, and the file the
    lab writes loads back to the same cluster."""
    netns = Netns(16, tag="1x0000")
    config = lab_config(netns, name="lab-1x0000")
    assert [s.host for s in config.nodes.values()] == [f"10.77.0.{i}" for i in range(1, 17)]
    assert {(s.peer_port, s.client_port) for s in config.nodes.values()} == {
        (PEER_PORT, CLIENT_PORT)
    }
    for i, s in config.nodes.items():  # what nodes bind and dial, not only the shorthand
        assert s.peer_listen == f"tcp:{PEER_PORT}:interface=10.77.0.{i}"
        assert s.client_address == f"tcp:host=10.77.0.{i}:port={CLIENT_PORT}"
    assert config.sync_interval == LAB_TIMERS["sync_interval"]
    assert config.idle_timeout == LAB_TIMERS["idle_timeout"]
    assert parse_config(dump_config(config)) == config


def test_flaps_allow_one_up_per_link_end_and_count_ends_left_down() -> None:
    """One re-connection per link end is the fault and its heal; more are flaps, and so
    is an end down at the end; a restarted node's counters start again from 0."""
    before = {
        (1, 2): LinkCount(1, 4, True),
        (2, 1): LinkCount(1, 4, True),
        (3, 4): LinkCount(1, 2, True),
        (4, 3): LinkCount(1, 7, True),
    }
    after = {
        (1, 2): LinkCount(1, 5, True),  # came back once: no flap
        (2, 1): LinkCount(1, 7, True),  # three ups: two flaps
        (3, 4): LinkCount(1, 3, False),  # up once, down now: one flap
        (4, 3): LinkCount(2, 1, True),  # node 4 restarted: its one up is no flap
    }
    assert count_flaps(before, after) == (3, 1 + 3 + 1 + 1)
    assert count_flaps(before, before) == (0, 0)


def test_nemesis_deals_every_fault_once_per_cycle() -> None:
    """Any len(FAULTS) consecutive rounds from a cycle boundary hold every kind once."""
    order = fault_order(random.Random(3))
    for _ in range(3):
        assert sorted(next(order) for _ in FAULTS) == sorted(FAULTS)


def test_driver_refuses_a_namespace_with_a_default_route() -> None:
    """The route guard sees a default route in /proc/net/route's format, and only that."""
    header = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
    subnet = "eth0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
    default = "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n"
    assert not has_route_out(header + subnet)
    assert has_route_out(header + subnet + default)


def test_soak_durations() -> None:
    """--duration takes seconds or a unit (s, m, h); anything else is one clear error."""
    assert [duration(t) for t in ("90", "90s", "30m", "2h")] == [90, 90, 1800, 7200]
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        duration("soon")


def _driver_with_node(answers: list[bool], rows: int) -> Driver:
    """A Driver over a fake node 1 holding ``rows`` messages, listed in pages of 2; each
    call answers or times out by ``answers`` (then answers), with no network at all."""
    config = lab_config(Netns(4, tag="1x0000"))
    driver = Driver(task.Clock(), config, "t")
    bodies = [f"m{i}" for i in range(rows)]
    held = [(id_text(message_id(b.encode())), b) for b in bodies]
    for body in bodies:
        driver.ledger.ack(message_id(body.encode()))
    script = iter(answers)

    class Proto:
        async def callRemote(self, command: Any, start: int, limit: int) -> dict[str, Any]:
            page = held[start : start + 2]
            return {
                "messages": [{"id": m, "body": b} for m, b in page],
                "next": start + len(page),
                "total": rows,
            }

    class Client:
        proto = Proto()

    async def call(node: int, fn: Any) -> Any:
        if not next(script, True):
            raise defer.TimeoutError()
        return await fn(Client())

    driver.call = call  # type: ignore[method-assign]
    return driver


def _run(driver: Driver, coro: Any) -> Any:
    clock = driver.reactor
    d = defer.Deferred.fromCoroutine(coro)
    for _ in range(10_000):
        if d.called:
            break
        clock.advance(0.25)
    return _result(d)


def _result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the driver never finished"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_a_listing_page_that_times_out_is_asked_again_not_counted_as_lost() -> None:
    """Under load a node may miss a page's deadline: the checker asks for that page
    again and finds every message, where it once counted all of them lost."""
    driver = _driver_with_node([True, False, False, True, True], rows=5)
    r = _run(driver, driver.converge([1], deadline=5.0))
    assert r["lost"] == 0 and r["unlisted"] == [] and r["converged"]


def test_a_node_that_never_answers_a_listing_is_reported_unlisted() -> None:
    """A node that cannot be listed before the deadline is a failed check of its own
    ("could not be listed"), never silently a pass and never a false count of losses."""
    driver = _driver_with_node([True] + [False] * 100_000, rows=3)
    r = _run(driver, driver.converge([1], deadline=1.0))
    assert r["unlisted"] == [1] and r["lost"] == 0


def _rows(*bodies: str) -> list[tuple[str, str]]:
    return [(id_text(message_id(b.encode())), b) for b in bodies]


def _raw(body: str) -> bytes:
    return message_id(body.encode())


def test_ledger_reads_each_node_once_and_knows_what_it_lacks() -> None:
    """Acknowledged ids a node has not listed are what it lacks; a read from where the
    last one stopped removes them, in whichever order acks and rows come."""
    ledger = Ledger([1, 2])
    ledger.listed(1, 0, _rows("a"), 1)  # listed before its ack reached the driver
    ledger.ack(_raw("a"))
    ledger.ack(_raw("b"))
    assert ledger.lacking[1] == {_raw("b")}
    assert ledger.lacking[2] == {_raw("a"), _raw("b")}
    ledger.listed(1, 1, _rows("b"), 2)
    ledger.listed(2, 0, _rows("b", "a"), 2)
    assert ledger.lacking == {1: set(), 2: set()}
    assert ledger.position == {1: 2, 2: 2}
    with pytest.raises(ValueError):
        ledger.listed(1, 0, _rows("a"), 1)  # never the same rows twice


def test_ledger_counts_duplicates_and_rows_whose_id_is_not_their_bodys_hash() -> None:
    """A node listing an id twice (in one read or across reads) has a duplicate; a row
    whose id is not the hash of its body is wrong, and never counts as held."""
    ledger = Ledger([1, 2])
    ledger.ack(_raw("a"))
    ledger.listed(1, 0, _rows("a", "b"), 2)
    ledger.listed(1, 2, _rows("a"), 3)
    ledger.listed(2, 0, [(id_text(_raw("a")), "not a")], 1)
    assert ledger.duplicates == {1: 1, 2: 0}
    assert ledger.wrong_rows == 1
    assert ledger.lacking[2] == {_raw("a")}


def test_ledger_forgets_a_node_whose_listing_got_shorter() -> None:
    """A node that lists fewer rows than were read (its log cut) is read again from 0,
    and what it no longer lists is lacking again."""
    ledger = Ledger([1])
    ledger.ack(_raw("a"))
    ledger.listed(1, 0, _rows("a"), 1)
    ledger.forget(1)
    assert ledger.position[1] == 0 and ledger.lacking[1] == {_raw("a")}
    ledger.listed(1, 0, _rows("a"), 1)
    assert ledger.duplicates[1] == 0 and not ledger.lacking[1]


def test_converge_reads_a_node_incrementally() -> None:
    """A second check reads only the rows after the first one's (a soak's checks cost
    what is new, not what was ever sent)."""
    driver = _driver_with_node([True] * 100, rows=5)
    first = _run(driver, driver.converge([1], deadline=5.0))
    assert first["lost"] == 0 and driver.ledger.position[1] == 5
    second = _run(driver, driver.converge([1], deadline=5.0))
    assert second["lost"] == 0 and second["duplicates"] == {}


def test_soak_overlay_options_become_cluster_settings() -> None:
    """--overlay dynamic and --replace-after reach the lab's cluster file; the default
    adds nothing (a static lab as before); --replace-after alone is a usage error."""
    assert lab_settings(parser().parse_args([])) == {}
    args = parser().parse_args(["--overlay", "dynamic", "--replace-after", "5s"])
    assert lab_settings(args) == {"overlay": "dynamic", "replace_after": 5.0}
    with pytest.raises(SystemExit) as e:
        main(["--replace-after", "5"])
    assert e.value.code == 2
