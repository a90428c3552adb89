"""The batched client path: ``GossipClient.submit_messages`` and ``Watch`` pushes.

A real ``GossipNode`` on a ``MemoryReactorClock`` (never started), joined to the
client by ``iosim`` as in ``test_client_protocol``; the node's ``submit_many`` is
wrapped to record the batches that reach it.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_client_protocol import Harness, SlowDurabilityStore, record_batch_sizes, watch
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.test import iosim

from gossip.client import api
from gossip.client.api import MAX_BATCHES_IN_FLIGHT, ClientAMP, GossipClient, batches
from gossip.client.commands import BATCH_BYTES, MessageRejected, RateLimited
from gossip.client.responder import ClientLimits, ClientProtocol
from gossip.core.message import Message, id_text, message_id


def record_batches(h: Harness) -> list[int]:
    """The size of every batch that enters the node through ``submit_many``."""
    return record_batch_sizes(h, "submit_many")


def pump(h: Harness, rounds: int = 50) -> None:
    for _ in range(rounds):
        h.reactor.advance(0)
        h.pump.flush()


def outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def slow_harness() -> tuple[Harness, SlowDurabilityStore]:
    h = Harness()
    store = h.store = h.node.store = SlowDurabilityStore()
    h.node.core.store = store
    return h, store


def test_submit_messages_sends_one_submit_many_per_batch_bytes_and_keeps_the_order() -> None:
    """1,500 bodies of 100 bytes (over two BATCH_BYTES) go as three SubmitMany calls,
    each within BATCH_BYTES, and the ids come back in the order of the bodies."""
    h = Harness()
    sizes = record_batches(h)
    bodies = [f"{i:05d}:" + "x" * 94 for i in range(1500)]
    ids = h.run(lambda: h.api.submit_messages(bodies))
    assert ids == [id_text(message_id(b.encode())) for b in bodies]
    assert sum(sizes) == 1500 and len(sizes) == 3
    assert all(n * (100 + 2) <= BATCH_BYTES for n in sizes)
    assert len(h.store) == 1500


def test_batches_cut_by_encoded_size() -> None:
    """The cut counts UTF-8 bytes plus AMP's 2-byte length per body, never splits a body
    and keeps the order; a body alone over the budget still gets its own batch."""
    assert batches(["ab", "cd", "ef"], max_bytes=8) == [["ab", "cd"], ["ef"]]
    assert batches(["é" * 3, "a"], max_bytes=8) == [["é" * 3], ["a"]]  # 6 + 2 bytes
    assert batches(["x" * 20, "y"], max_bytes=8) == [["x" * 20], ["y"]]
    assert batches([], max_bytes=8) == []


def test_submit_messages_keeps_a_bounded_number_of_batches_in_flight() -> None:
    """With answers held back (the node waits for its group commit), a client sends at
    most MAX_BATCHES_IN_FLIGHT SubmitMany calls; the rest wait in the client and go once
    answers come; every id is returned once all are durable."""
    h, store = slow_harness()
    sizes = record_batches(h)
    # 2,000-byte bodies: few messages (under the connection's submit burst), many batches.
    per_batch = BATCH_BYTES // 2002
    bodies = [f"{i:05d}:" + "y" * 1994 for i in range(per_batch * (MAX_BATCHES_IN_FLIGHT + 3))]
    got = outcome(Deferred.fromCoroutine(h.api.submit_messages(bodies)))
    pump(h)
    assert len(sizes) == MAX_BATCHES_IN_FLIGHT and not got
    for _ in range(10):
        store.make_durable()
        pump(h)
    assert len(sizes) == MAX_BATCHES_IN_FLIGHT + 3
    assert got == [[id_text(message_id(b.encode())) for b in bodies]]


def test_one_group_commit_answers_a_whole_batch_in_one_box() -> None:
    """The durability answers of a batch leave together, as one AMP answer, once the group
    commit that covers the whole batch completes: none before it."""
    h, store = slow_harness()
    answers: list[bytes] = []
    real = h.server.sendBox

    def send_box(box: Any) -> None:
        if b"_answer" in box:
            answers.append(box[b"_answer"])
        real(box)

    h.server.sendBox = send_box  # type: ignore[method-assign]
    bodies = [f"commit {i}" for i in range(40)]
    got = outcome(Deferred.fromCoroutine(h.api.submit_messages(bodies)))
    pump(h)
    assert answers == [] and not got
    store.make_durable()
    pump(h)
    assert len(answers) == 1 and got == [[id_text(message_id(b.encode())) for b in bodies]]


def test_submit_messages_refuses_a_bad_message_before_sending_naming_it() -> None:
    """A body no node would take (here the 3rd, empty) fails the whole call with
    MessageRejected naming its position, and nothing is sent."""
    h = Harness()
    sizes = record_batches(h)
    with pytest.raises(MessageRejected, match="message 3 of 4: message is empty"):
        h.run(lambda: h.api.submit_messages(["a", "b", "", "d"]))
    assert sizes == [] and len(h.store) == 0


def test_blocking_submit_messages_checks_every_message_before_connecting() -> None:
    """The blocking form refuses a bad body before it starts a reactor or connects."""
    with pytest.raises(MessageRejected, match="message 2 of 2: message is empty"):
        api.submit_messages(["fine", ""], node=1, config="/nonexistent/cluster.toml")


def test_submit_messages_names_the_first_message_the_node_refused() -> None:
    """Over the connection's submit burst, the node refuses the excess: the call raises
    RateLimited naming the first refused message, and the ones before it are stored
    (submitting the same list again is safe: ids are hashes)."""
    h = Harness()
    limits = ClientLimits(submit_rate=1, submit_burst=3)
    client, _server, h.pump = iosim.connectedServerAndClient(
        lambda: ClientProtocol(h.node, limits), ClientAMP
    )
    batch_api = GossipClient(client, "test")
    with pytest.raises(RateLimited, match=r"message 4 of 5: .*rate limit"):
        h.run(lambda: batch_api.submit_messages([f"m{i}" for i in range(5)]))
    assert len(h.store) == 3


def test_submits_of_many_reads_before_one_group_commit_reach_a_watcher_in_one_push() -> None:
    """Watch pushes ranges: what one group commit made durable, whatever the number of
    submits and reads before it, reaches a watcher as one Delivered box with every id,
    at the position of the first (one box per commit, not one per id)."""
    h, store = slow_harness()
    _, got = watch(h)
    submitter = GossipClient(h.client, "test")
    bodies = [f"range {i}" for i in range(30)]
    for chunk in (bodies[:10], bodies[10:25], bodies[25:]):
        outcome(Deferred.fromCoroutine(submitter.submit_messages(chunk)))
        pump(h)
    assert got == []
    store.make_durable()
    pump(h)
    assert got == [(0, [message_id(b.encode()) for b in bodies])]


def test_a_failed_batch_fails_the_call_with_the_nodes_reason() -> None:
    """A batch the node refuses as a whole (its store failed) fails ``submit_messages``
    with the node's one-line reason, not a traceback or a silent partial result."""
    h = Harness()
    h.node.failed = "cannot append to /data/messages.log: No space left on device"
    got = outcome(Deferred.fromCoroutine(h.api.submit_messages(["a", "b"])))
    pump(h)
    assert len(got) == 1 and isinstance(got[0], Failure)
    assert got[0].check(MessageRejected) and "No space left" in str(got[0].value)


def test_per_turn_batches_of_single_submits_share_the_in_flight_bound() -> None:
    """``submit_message`` calls made over many reactor turns go as one SubmitMany per
    turn, and those count against the same MAX_BATCHES_IN_FLIGHT: while answers are held
    back, no more than that many are on the wire; the rest follow as answers come."""
    h, store = slow_harness()
    sizes = record_batches(h)
    client = GossipClient(h.client, "test", reactor=h.reactor)
    turns = MAX_BATCHES_IN_FLIGHT + 4
    got = []
    for turn in range(turns):
        for k in range(2):
            got.append(outcome(Deferred.fromCoroutine(client.submit_message(f"t{turn}.{k}"))))
        pump(h, rounds=1)
    pump(h)
    assert sizes == [2] * MAX_BATCHES_IN_FLIGHT
    for _ in range(10):
        store.make_durable()
        pump(h)
    assert sizes == [2] * turns
    assert [g[0] for g in got] == [
        id_text(message_id(f"t{t}.{k}".encode())) for t in range(turns) for k in range(2)
    ]


def test_a_submit_many_reaches_the_store_as_one_batch_and_counts_each_outcome() -> None:
    """The node hands a SubmitMany's bodies to the core as one batch: its new messages
    reach the store in one ``add_many`` (no ``add`` per message), and the submit
    outcomes are still counted per body (stored, duplicate, rejected)."""
    h = Harness()
    h.store_bodies([b"held"])
    calls: list[str] = []
    add, add_many = h.store.add, h.store.add_many

    def count_add(m: Message) -> bool:
        calls.append("add")
        return add(m)

    def count_add_many(first: Any, *rest: Any) -> int:  # messages, or the id column first
        calls.append(f"add_many {len(first)}")
        h.store.add = add  # type: ignore[method-assign]  # (the memory store's own adds)
        try:
            return add_many(first, *rest)
        finally:
            h.store.add = count_add  # type: ignore[method-assign]

    h.store.add = count_add  # type: ignore[method-assign]
    h.store.add_many = count_add_many  # type: ignore[method-assign]
    r = h.call(api.SubmitMany, bodies=["a", "b", "", "held", "a", "c"])
    assert r["ids"][2] == "" and "empty" in r["errors"][2]
    assert r["ids"][4] == r["ids"][0] == id_text(message_id(b"a"))
    assert calls == ["add_many 3"]
    assert {k: v for k, v in h.node.submit_outcomes.items() if v} == {
        "stored": 3,
        "duplicate": 2,
        "rejected": 1,
    }
