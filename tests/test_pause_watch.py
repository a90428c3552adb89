"""A node resumed after SIGSTOP keeps its links (issue 9, found by the netns lab).

After SIGCONT the reactor runs every timer that came due while the process was
stopped before it reads what its neighbours kept sending into the sockets
(``epoll_wait`` returns EINTR after a stop). Here a process's pause is a jump of
its fake clock with the bytes its peers sent meanwhile not yet delivered: idle
and handshake timeouts and the stalled-link check must judge silence from when
the reactor ran again (``gossip.pause_watch``), not from the last frame.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_client_protocol import Harness
from test_peer_protocol import IDLE, PING, Node, framed, hello, pair
from twisted.internet.task import Clock
from twisted.test import iosim

from gossip.net.links import HELLO_TIMEOUT
from gossip.pause_watch import BEAT_SECONDS, PAUSE_AFTER, PauseWatch

STALL_SECONDS = 30.0
STEP = 0.05  # seconds per step of a running process's clock


def run(clock: Clock, seconds: float, each: Callable[[], object] = lambda: None) -> None:
    """A running process: its clock moves in small steps (``each`` after every one)."""
    for _ in range(round(seconds / STEP)):
        clock.advance(STEP)
        each()


def run_both(n1: Node, n2: Node, pump: iosim.IOPump, seconds: float) -> None:
    """Both processes running: their clocks move together and bytes flow."""
    for _ in range(round(seconds / STEP)):
        n1.reactor.advance(STEP)
        n2.reactor.advance(STEP)
        pump.flush()


def test_watch_notices_a_gap_only_while_it_beats() -> None:
    """A gap longer than PAUSE_AFTER between two moments the reactor ran is a pause:
    silence is measured from when it ran again. Timers merely late by less, or any
    gap while the watch is not started (an idle reactor looks the same), are not."""
    clock = Clock()
    watch = PauseWatch(clock)
    clock.advance(50)
    assert watch.running_since(10) == 10, "not started: nothing adjusted"
    watch.start()
    for _ in range(40):
        clock.advance(BEAT_SECONDS)
    clock.advance(PAUSE_AFTER * 0.9)  # a busy reactor's late timer
    assert watch.running_since(10) == 10 and watch.pauses == 0
    clock.advance(PAUSE_AFTER + 5)  # stopped: no beat meanwhile
    resumed = clock.seconds()
    assert watch.running_since(10) == resumed and watch.pauses == 1
    run(clock, 3)
    assert watch.pauses == 1
    assert watch.running_since(10) == resumed
    assert watch.running_since(resumed + 1) == resumed + 1
    assert clock.seconds() == pytest.approx(resumed + 3)
    watch.stop()


def test_a_resumed_node_reads_waiting_pings_before_judging_its_links_idle() -> None:
    """Node 1 is stopped for 12 s while node 2 keeps pinging it; its idle timer came due
    meanwhile (last Ping heard 15.5 s before the resume). Resumed, it reads the
    waiting Pings and keeps the link: up once on each side, never down. A neighbour
    that stays silent after the resume is still timed out, idle_timeout later."""
    n1, n2 = Node(1), Node(2)
    _, _, pump = pair(n1, n2)
    pump.flush()
    n1.table.start()  # pings at 5, 10, 15...
    run_both(n1, n2, pump, 2.5)
    n2.table.start()  # pings at 7.5, 12.5, 17.5...
    run_both(n1, n2, pump, 13.5)
    # At 16 s node 1 last heard a Ping at 12.5 s (idle deadline 27.5), node 2 at 15 s.
    assert n1.rec.events == [("up", 2)] and n2.rec.events == [("up", 1)]
    run(n2.reactor, 12.0)  # node 2 runs (and pings) while node 1 is stopped
    n1.reactor.advance(12.0)  # node 1 resumes at 28 s: its clock jumps past 27.5
    assert n1.table.pauses.pauses == 1
    assert n1.table.is_up(2), "its idle timer waited for the pending input"
    run_both(n1, n2, pump, 3 * IDLE)
    assert n1.rec.events == [("up", 2)] and n2.rec.events == [("up", 1)]
    # Node 2 stopped now: node 1 hears nothing more and times the link out.
    run(n1.reactor, IDLE + PING)
    pump.flush()
    assert n1.rec.events == [("up", 2), ("down", 2)]
    n1.table.stop()
    n2.table.stop()


def test_a_hello_waiting_through_a_pause_is_read_before_the_handshake_timeout() -> None:
    """An inbound connection whose Hello arrived while the node was stopped past
    hello_timeout is not cut on the resume: the Hello is read and the link comes up.
    One that sends nothing after the resume is cut hello_timeout later."""
    node = Node(2)
    node.table.pauses.start()
    waiting, waiting_t = node.inbound()
    _, silent_t = node.inbound("127.0.0.2")
    node.reactor.advance(HELLO_TIMEOUT + 5)  # stopped, then resumed
    assert not waiting_t.disconnecting and not silent_t.disconnecting
    waiting.dataReceived(framed(hello(1)))
    assert waiting.established and node.rec.events == [("up", 1)]
    run(node.reactor, HELLO_TIMEOUT - 2 * STEP)
    assert not silent_t.disconnecting
    run(node.reactor, 2 * STEP)
    assert silent_t.disconnected and not waiting_t.disconnecting
    node.table.pauses.stop()


def test_a_link_full_before_a_pause_is_not_dropped_as_stalled_on_the_resume() -> None:
    """A link that filled up just before the node was stopped for longer than
    LINK_STALL_SECONDS (30 s) is not dropped on the resume: the reactor could not write
    meanwhile. It is dropped if it stays full 30 s of running time after the resume."""
    h = Harness()
    dropped: list[int] = []
    h.node.links.drop = lambda peer, reason, kind=None: dropped.append(peer)  # type: ignore[method-assign]
    h.node.links.pauses.start()
    h.node._congestion(2, True)
    run(h.reactor, 1, h.node.tick)
    h.reactor.advance(STALL_SECONDS + 10)  # stopped, then resumed
    h.node.tick()
    assert dropped == [] and h.node.congested
    run(h.reactor, STALL_SECONDS - 0.5, h.node.tick)
    assert dropped == []
    run(h.reactor, 0.6, h.node.tick)
    assert dropped == [2]
    h.node.links.pauses.stop()
