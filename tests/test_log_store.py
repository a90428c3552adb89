"""The durable message log (gossip.store.log): format, fsync policies, recovery, crash safety.

Most tests use fsync="never" (durability is not what they look at); the
policy tests run against the real reactor (pytest-twisted), and the crash
tests SIGKILL a child process that appends to the log.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_log_store_batch import AT, columns
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogLevel, formatEvent

from gossip.core.message import Message, message_id
from gossip.store import fsync_pacing
from gossip.store import log as log_module
from gossip.store import recovery as recovery_module
from gossip.store.fsync_pacing import GAP_FACTOR, FsyncPacer
from gossip.store.group_commit import GroupCommit
from gossip.store.log import (
    LOG_NAME,
    MAGIC,
    MAX_PATH,
    MAX_RECORD_BYTES,
    LogStore,
    StoreError,
    encode_record,
)
from gossip.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------


def msg(i: int, size: int = 40, at: float | None = None) -> Message:
    """Message ``i``, received at ``at`` (default: a time of its own)."""
    body = f"message {i} ".encode() + "é".encode() * (i % 7) + b"x" * (size + i % 13)
    return Message(message_id(body), body, 1000.0 + i if at is None else at, tuple(range(i % 4)))


class Captured:
    """A Logger whose events are kept, for checking what recovery reported."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.warn]


def open_store(directory: Path, **kw: Any) -> tuple[LogStore, Captured]:
    cap = Captured()
    kw.setdefault("fsync", "never")
    return LogStore.open(directory, log=cap.log, **kw), cap


def inline_batch_store(
    directory: Path, clock: Clock, fsync_seconds: float, batch_interval: float
) -> LogStore:
    """A batch-fsync store on ``clock`` whose fsyncs run inline and take
    ``fsync_seconds`` of wall time (a sleep), as on a slow or busy disk."""
    store, _ = open_store(
        directory,
        reactor=clock,
        fsync="batch",
        fsync_function=lambda fd: time.sleep(fsync_seconds),
        inline_fsync_below=1.0,
        batch_interval=batch_interval,
    )
    return store


def count_writes(store: LogStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the ``os.write`` calls on ``store``'s log file from now on."""
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        if fd == store._fd:
            writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    return writes


def write_log(directory: Path, messages: list[Message]) -> list[int]:
    """Make a log holding ``messages``; return each record's offset."""
    store, _ = open_store(directory)
    for m in messages:
        store.add(m)
    store.close()
    offsets = []
    pos = len(MAGIC)
    for m in messages:
        offsets.append(pos)
        pos += len(encode_record(m))
    assert (directory / LOG_NAME).stat().st_size == pos
    return offsets


def contents(store: LogStore) -> list[Message]:
    return list(store.scan(0))


def check_same(store: LogStore, model: MemoryStore, probes: list[tuple[bytes, bytes]]) -> None:
    """Everything a reader can ask gives the same answer from ``store`` and ``model``."""
    assert len(store) == len(model)
    assert list(store.scan(0)) == list(model.scan(0))
    for start in (1, len(model) // 2, len(model), len(model) + 3):
        assert list(store.scan(start)) == list(model.scan(start))
    for m in model.scan(0):
        assert m.id in store
        assert store.get(m.id) == m
    assert sorted(store.ids()) == sorted(m.id for m in model.scan(0))
    for lo, hi in probes:
        for limit in (0, 1, 5, 1000):
            assert store.ids_between(lo, hi, limit) == model.ids_between(lo, hi, limit)


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.002)):
        if cond():
            return
        await deferLater(reactor, 0.002, lambda: None)
    raise AssertionError("condition not reached in time")


# -- format and round trip -----------------------------------------------------------


def test_record_layout_matches_the_documented_format() -> None:
    """A record is crc32 | length | kind | id | received_at | path count | path | body,
    little-endian, with the crc over the length bytes and the payload."""
    body = "Grüße".encode()
    m = Message(message_id(body), body, 12.5, (3, 70000))
    rec = encode_record(m)
    crc, length = struct.unpack_from("<II", rec)
    payload = rec[8:]
    assert length == len(payload) == 1 + 16 + 8 + 2 + 2 * 4 + len(body)
    assert crc == zlib.crc32(rec[4:])
    assert payload[0] == 1
    assert payload[1:17] == m.id
    assert struct.unpack_from("<dH2I", payload, 17) == (12.5, 2, 3, 70000)
    assert payload[35:] == body


def test_new_log_is_just_the_magic(tmp_path: Path) -> None:
    """Opening an empty directory creates it, the lock file and a log holding only the magic."""
    directory = tmp_path / "a" / "b"
    store, _ = open_store(directory)
    assert len(store) == 0 and list(store.scan(0)) == []
    store.close()
    assert (directory / LOG_NAME).read_bytes() == MAGIC


bodies = st.text(max_size=120).map(str.encode)
paths = st.lists(st.integers(0, 2**32 - 1), max_size=6).map(tuple)
times = st.floats(allow_nan=False)
ids16 = st.binary(min_size=16, max_size=16)


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(st.tuples(bodies, paths, times), max_size=25),
    dup_picks=st.lists(st.integers(0, 1000), max_size=5),
    probes=st.lists(st.tuples(ids16, ids16), max_size=3),
    policy=st.sampled_from(["never", "always"]),
)
def test_round_trip_through_close_and_reopen(
    items: list[tuple[bytes, tuple[int, ...], float]],
    dup_picks: list[int],
    probes: list[tuple[bytes, bytes]],
    policy: str,
) -> None:
    """Arbitrary messages (unicode bodies, paths, times) come back identical after
    close/reopen, in arrival order; a repeated id is ignored (the first copy wins),
    and get / ids_between / len agree with the in-memory store."""
    messages = [Message(message_id(b), b, t, p) for b, p, t in items]
    if messages:
        for k in dup_picks:
            first = messages[k % len(messages)]
            messages.append(Message(first.id, first.body, first.received_at + 1, (7,)))
    probes = [*probes, (b"\x00" * 16, b"\xff" * 16 + b"\x00")]
    model = MemoryStore()
    with tempfile.TemporaryDirectory() as d:
        store, _ = open_store(Path(d), fsync=policy)
        for m in messages:
            assert store.add(m) == model.add(m)
        check_same(store, model, probes)
        store.close()
        store, cap = open_store(Path(d))
        check_same(store, model, probes)
        assert cap.warnings() == []
        store.close()


def test_duplicate_records_in_the_log_keep_the_first(tmp_path: Path) -> None:
    """A log holding the same id twice (a crash plus re-sync can do that) reopens
    with the first record's copy, once."""
    a = msg(1)
    a2 = Message(a.id, a.body, 5.0, (9, 9))
    (tmp_path / LOG_NAME).write_bytes(
        MAGIC + encode_record(a) + encode_record(msg(2)) + encode_record(a2)
    )
    store, cap = open_store(tmp_path)
    assert contents(store) == [a, msg(2)]
    assert store.get(a.id) == a
    assert cap.warnings() == []
    assert store.stats()["duplicates_at_open"] == 1


@pytest.mark.parametrize("bad", ["short id", "long path", "path entry"])
def test_add_refuses_a_message_it_cannot_encode(tmp_path: Path, bad: str) -> None:
    """A message that has no record (an id not 16 bytes long, a path of more than
    65,535 entries or an entry past u32) is refused with ValueError, nothing written.
    Whether the id is the hash of the body is the caller's check (the core makes
    it for everything it accepts), so add does not hash again."""
    body = b"body"
    message = {
        "short id": Message(message_id(body)[:8], body, 0.0, ()),
        "long path": Message(message_id(body), body, 0.0, (1,) * (MAX_PATH + 1)),
        "path entry": Message(message_id(body), body, 0.0, (2**32,)),
    }[bad]
    store, _ = open_store(tmp_path)
    with pytest.raises(ValueError):
        store.add(message)
    assert len(store) == 0 and store.stats()["file_bytes"] == len(MAGIC)
    store.close()
    assert (tmp_path / LOG_NAME).read_bytes() == MAGIC


# -- buffered appends ----------------------------------------------------------------


def file_size(directory: Path) -> int:
    return (directory / LOG_NAME).stat().st_size


def test_appends_are_readable_at_once_and_written_together_at_the_end_of_the_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records added in one reactor turn are in the file after the turn, written
    with one os.write; before that get and scan already see them (a read writes the
    buffer out first), and so does when_durable."""
    clock = Clock()
    store, _ = open_store(tmp_path, reactor=clock)
    writes = count_writes(store, monkeypatch)
    messages = [msg(i) for i in range(9)]
    records = [encode_record(m) for m in messages]
    for m in messages[:3]:
        store.add(m)
    assert file_size(tmp_path) == len(MAGIC)
    assert store.stats()["buffered_bytes"] == sum(map(len, records[:3]))
    clock.advance(0)
    assert (tmp_path / LOG_NAME).read_bytes() == MAGIC + b"".join(records[:3])
    assert writes == [sum(map(len, records[:3]))]
    assert store.stats()["buffered_bytes"] == 0

    store.add(messages[3])
    store.add(messages[4])
    assert store.get(messages[4].id) == messages[4]
    store.add(messages[5])
    assert contents(store) == messages[:6]
    store.add(messages[6])
    assert store.when_durable().called  # "never": fires at once, once written
    assert len(writes) == 4
    assert file_size(tmp_path) == len(MAGIC) + sum(map(len, records[:7]))

    store.add(messages[7])
    store.add(messages[8])
    store.close()  # writes what is left; the pending end-of-turn write is dropped
    clock.advance(0)
    assert (tmp_path / LOG_NAME).read_bytes() == MAGIC + b"".join(records)


def test_add_many_takes_a_batch_with_one_write_and_counts_the_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``add_many`` adds the new messages of a batch in order (not those already held,
    nor a repeat within the batch) and returns their count, as one buffered entry: one
    ``os.write`` at the end of the turn, the same bytes a run of ``add`` leaves;
    readable at once and after a reopen."""
    clock = Clock()
    store, _ = open_store(tmp_path, reactor=clock)
    writes = count_writes(store, monkeypatch)
    m = [msg(i, at=AT) for i in range(5)]
    store.add(m[0])
    clock.advance(0)
    assert store.add_many(*columns([m[1], m[0], m[2], m[1], m[3]])) == 3
    assert store.add_many(*columns([])) == 0
    assert [store.get(x.id) for x in m[:4]] == m[:4] and m[4].id not in store
    assert store.ids_from(0, 10) == [x.id for x in m[:4]] and len(store) == 4
    clock.advance(0)
    batch = [encode_record(x) for x in (m[1], m[2], m[3])]
    assert writes == [len(encode_record(m[0])), sum(map(len, batch))]
    assert (tmp_path / LOG_NAME).read_bytes() == MAGIC + encode_record(m[0]) + b"".join(batch)
    store.close()
    store, _ = open_store(tmp_path)
    assert contents(store) == m[:4]
    store.close()


def test_add_many_under_always_costs_one_fsync_per_batch(tmp_path: Path) -> None:
    """With "always", a batch is written and fsynced once before ``add_many`` returns
    (a run of ``add`` fsyncs once per message), and counts as durable."""
    synced: list[int] = []
    store, _ = open_store(tmp_path, fsync="always", fsync_function=synced.append)
    assert store.add_many(*columns([msg(i, at=AT) for i in range(20)])) == 20
    assert len(synced) == 1 and store.durable_count() == 20
    assert file_size(tmp_path) == len(MAGIC) + sum(len(encode_record(msg(i))) for i in range(20))
    store.close()


def test_add_many_is_all_or_nothing_on_a_message_it_cannot_encode(tmp_path: Path) -> None:
    """A batch holding a message that cannot be encoded raises ``ValueError`` and adds
    none of the batch, not even the messages before it."""
    store, _ = open_store(tmp_path, reactor=Clock())
    huge = b"x" * (MAX_RECORD_BYTES + 1)
    bad = Message(message_id(huge), huge, AT, ())
    with pytest.raises(ValueError, match="at most"):
        store.add_many(*columns([msg(1, at=AT), bad, msg(2, at=AT)]))
    assert len(store) == 0 and msg(1).id not in store
    assert store.add_many(*columns([msg(1, at=AT)])) == 1
    store.close()


def test_buffer_is_written_when_it_passes_its_bound(tmp_path: Path) -> None:
    """A turn that adds more than 1 MiB does not keep it all in memory: the buffer is
    written out once it passes 1 MiB."""
    clock = Clock()
    store, _ = open_store(tmp_path, reactor=clock)
    messages = [msg(i, size=50_000) for i in range(60)]
    largest = max(len(encode_record(m)) for m in messages)
    for m in messages:
        store.add(m)
        assert store.stats()["buffered_bytes"] <= (1 << 20) + largest
    assert file_size(tmp_path) > 2 << 20
    clock.advance(0)
    assert file_size(tmp_path) == store.stats()["file_bytes"]
    store.close()
    store, _ = open_store(tmp_path)
    assert contents(store) == messages
    store.close()


@pytest.mark.parametrize("policy", ["never", "batch"])
def test_reopen_after_close_recovers_every_buffered_record(tmp_path: Path, policy: str) -> None:
    """Whether or not the turn ended, everything added before close is in the log
    when it is opened again, in arrival order."""
    clock = Clock()
    rng = random.Random(policy)
    store, _ = open_store(tmp_path, reactor=clock, fsync=policy)
    messages = [msg(i, size=rng.randrange(10, 30_000)) for i in range(300)]
    for m in messages:
        store.add(m)
        if rng.random() < 0.05:
            clock.advance(0)
    store.close()
    store, cap = open_store(tmp_path)
    assert contents(store) == messages
    assert cap.warnings() == []
    store.close()


@pytest_twisted.ensureDeferred
async def test_when_durable_writes_and_fsyncs_buffered_records(tmp_path: Path) -> None:
    """With "batch", the fsync that fires when_durable starts with every record
    buffered before the call in the file (the write happens there, once for all the
    submits of a turn)."""
    starts: list[int] = []

    def recording_fsync(fd: int) -> None:
        starts.append(os.fstat(fd).st_size)
        os.fsync(fd)

    store, _ = open_store(tmp_path, fsync="batch", fsync_function=recording_fsync)
    try:
        for i in range(10):
            store.add(msg(i))
        end = store.stats()["file_bytes"]
        assert file_size(tmp_path) < end
        d = store.when_durable()
        await d
        assert starts == [end]
        assert store.stats()["durable_bytes"] == end
    finally:
        store.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_failed_end_of_turn_write_breaks_the_store(tmp_path: Path) -> None:
    """If the end-of-turn write fails, the records in it are lost although add took
    them: the store refuses further appends with a one-line StoreError, the
    when_durable waiters and when_broken fire with it, the lost records are no longer
    held (reads find nothing, no error), and the log reopens with what was written
    before."""
    clock = Clock()
    store, cap = open_store(tmp_path, reactor=clock, fsync="batch")
    written, lost = msg(1), msg(2)
    store.add(written)
    store.write_buffered()  # msg(1) is written; its fsync is due at the end of the turn
    waiter = store.when_durable()
    failures: list[BaseException] = []
    waiter.addErrback(lambda f: failures.append(f.value))
    broken: list[StoreError] = []
    store.when_broken().addCallback(broken.append)
    store.add(lost)
    full = os.open("/dev/full", os.O_RDWR)
    try:
        os.dup2(full, store._fd)  # every write now fails with ENOSPC
    finally:
        os.close(full)
    clock.advance(0)
    (error,) = failures
    assert isinstance(error, StoreError)
    text = str(error)
    assert "\n" not in text and str(tmp_path / LOG_NAME) in text
    assert "No space left on device" in text and "refusing further appends" in text
    assert any(e["log_level"] == LogLevel.critical for e in cap.events)
    with pytest.raises(StoreError, match="refusing further appends"):
        store.add(msg(3))
    store.when_durable().addErrback(lambda f: failures.append(f.value))
    assert len(failures) == 2 and str(failures[1]) == text
    assert [str(e) for e in broken] == [text]
    assert store.get(lost.id) is None and lost.id not in store
    assert (len(store), list(store.ids())) == (1, [written.id])
    assert store.ids_between(b"", b"\xff" * 17, 10) == [written.id]
    with pytest.raises(StoreError, match="refusing further appends"):
        store.write_buffered()
    store.close()
    store, _ = open_store(tmp_path)
    assert contents(store) == [written]
    store.close()


def test_ids_between_with_interleaved_adds_and_queries(tmp_path: Path) -> None:
    """The id order is kept lazily (new ids are sorted in when a query needs them):
    adds and queries in any mix answer as a sorted list would, for both stores."""
    rng = random.Random(11)
    store, _ = open_store(tmp_path, reactor=Clock())
    memory = MemoryStore()
    held: list[bytes] = []
    for i in range(600):
        m = msg(i)
        store.add(m)
        memory.add(m)
        held.append(m.id)
        if rng.random() < 0.2 or i < 5:
            a, b = sorted((rng.choice(held), rng.randbytes(16)))
            limit = rng.choice((0, 1, 3, 50, 1000))
            expected = [x for x in sorted(held) if a <= x < b][:limit]
            assert store.ids_between(a, b, limit) == expected
            assert memory.ids_between(a, b, limit) == expected
    full = (b"\x00" * 16, b"\xff" * 17, 10_000)
    assert store.ids_between(*full) == memory.ids_between(*full) == sorted(held)
    store.close()


# -- fsync policies ------------------------------------------------------------------


def test_always_fsyncs_every_add_and_never_none(tmp_path: Path) -> None:
    """ "always" fsyncs once per add before it returns; "never" not at all; for both,
    when_durable has already fired."""
    for policy, expected in (("always", 5), ("never", 0)):
        store, _ = open_store(tmp_path / policy, fsync=policy)
        for i in range(5):
            store.add(msg(i))
        assert store.stats()["fsyncs"] == expected
        assert store.when_durable().called
        store.close()


@pytest_twisted.ensureDeferred
async def test_batch_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    """With "batch", a thousand adds in one reactor turn are made durable by one or two
    fsyncs; when_durable fires once they are, and close leaves nothing pending."""
    store, _ = open_store(tmp_path, fsync="batch")
    for i in range(1000):
        store.add(msg(i))
    d = store.when_durable()
    assert not d.called
    await d
    stats = store.stats()
    assert 1 <= stats["fsyncs"] <= 2
    assert stats["durable_bytes"] == stats["file_bytes"]
    assert store.when_durable().called  # nothing new: fires at once
    store.close()


@pytest_twisted.ensureDeferred
async def test_batch_durable_only_after_an_fsync_that_started_after_the_write(
    tmp_path: Path,
) -> None:
    """A record's when_durable waits for an fsync that started after the record was
    written: records written while an fsync is in flight wait for the next one, and
    only one fsync runs at a time."""
    gates: list[threading.Event] = []
    started: list[int] = []  # file size when each fsync started
    lock = threading.Lock()

    def slow_fsync(fd: int) -> None:
        gate = threading.Event()
        with lock:
            gates.append(gate)
            started.append(os.fstat(fd).st_size)
        gate.wait(10)

    store, _ = open_store(
        tmp_path, fsync="batch", fsync_function=slow_fsync, inline_fsync_below=0.0
    )
    try:
        store.add(msg(1))
        end1 = store.stats()["file_bytes"]
        d1 = store.when_durable()
        await wait_until(lambda: len(started) == 1)
        assert started[0] == end1
        store.add(msg(2))
        end2 = store.stats()["file_bytes"]
        d2 = store.when_durable()
        await deferLater(reactor, 0.05, lambda: None)  # many batch intervals
        assert len(started) == 1, "a second fsync started while one was in flight"
        assert not d1.called and not d2.called
        gates[0].set()
        await d1
        assert not d2.called
        await wait_until(lambda: len(started) == 2)
        assert started[1] == end2
        await deferLater(reactor, 0.02, lambda: None)
        assert not d2.called
        gates[1].set()
        await d2
        assert store.stats()["fsyncs"] == 2
    finally:
        for g in gates:
            g.set()
        store.close()


@pytest_twisted.ensureDeferred
async def test_batch_interleaved_adds_each_wait_for_a_covering_fsync(tmp_path: Path) -> None:
    """Adds and when_durable calls at random moments: every Deferred fires only after
    an fsync that began with the file at least as long as it was at the call, and
    fsyncs are fewer than adds."""
    done_starts: list[int] = []  # start sizes of completed fsyncs
    lock = threading.Lock()
    rng = random.Random(7)

    def recording_fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        os.fsync(fd)
        with lock:
            done_starts.append(size)

    store, _ = open_store(tmp_path, fsync="batch", fsync_function=recording_fsync)
    waits: list[Deferred[None]] = []
    n = 0
    for _ in range(40):
        for _ in range(rng.randrange(1, 8)):
            store.add(msg(n))
            n += 1
        end = store.stats()["file_bytes"]

        def check(_: None, end: int = end) -> None:
            with lock:
                assert max(done_starts, default=0) >= end

        waits.append(store.when_durable().addCallback(check))
        if rng.random() < 0.5:
            await deferLater(reactor, rng.uniform(0, 0.004), lambda: None)
    for d in waits:
        await d
    assert 1 <= store.stats()["fsyncs"] < n
    store.close()


@pytest_twisted.ensureDeferred
async def test_batch_close_makes_pending_records_durable(tmp_path: Path) -> None:
    """close() fsyncs what is pending and fires the waiting Deferreds."""
    store, _ = open_store(tmp_path, fsync="batch", batch_interval=10.0)
    store.add(msg(1))
    d = store.when_durable()
    assert not d.called
    store.close()
    assert d.called
    await d
    assert store.stats()["fsyncs"] == 1


@pytest_twisted.ensureDeferred
async def test_batch_failed_fsync_fails_waiters_and_stops_appends(tmp_path: Path) -> None:
    """When an fsync fails, the Deferreds waiting for it fail with StoreError and the
    store refuses further appends (retrying fsync cannot be trusted)."""

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    store, cap = open_store(tmp_path, fsync="batch", fsync_function=failing_fsync)
    store.add(msg(1))
    with pytest.raises(StoreError):
        await store.when_durable()
    with pytest.raises(StoreError):
        store.add(msg(2))
    assert any(e["log_level"] == LogLevel.critical for e in cap.events)
    store.close()


# -- torn tails ------------------------------------------------------------------------


def test_torn_tail_at_every_offset_is_truncated(tmp_path: Path) -> None:
    """Cutting the file anywhere inside the last record (its header included) loses
    only that record: the file is truncated to the previous one with a warning giving
    the offset and byte count, and appends after recovery survive another reopen."""
    messages = [msg(i) for i in range(5)]
    src = tmp_path / "src"
    offsets = write_log(src, messages)
    data = (src / LOG_NAME).read_bytes()
    last = offsets[-1]
    for cut in range(last + 1, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / LOG_NAME).write_bytes(data[:cut])
        store, cap = open_store(d)
        assert contents(store) == messages[:-1]
        assert (d / LOG_NAME).stat().st_size == last
        (warning,) = cap.warnings()
        assert f"truncated {cut - last} bytes at offset {last}" in warning
        assert not list(d.glob("*.damaged-*"))
        store.add(msg(99))
        store.close()
        store, cap = open_store(d)
        assert contents(store) == [*messages[:-1], msg(99)]
        assert cap.warnings() == []
        store.close()


def test_bad_checksum_on_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    """A last record ending exactly at end of file with a bad checksum is dropped as a
    torn append (no damaged copy)."""
    messages = [msg(i) for i in range(3)]
    offsets = write_log(tmp_path, messages)
    flip(tmp_path / LOG_NAME, offsets[-1] + 20)
    store, cap = open_store(tmp_path)
    assert contents(store) == messages[:-1]
    assert "torn tail" in cap.warnings()[0]
    assert not list(tmp_path.glob("*.damaged-*"))


def test_cut_short_creation_starts_afresh(tmp_path: Path) -> None:
    """A log shorter than the magic and a prefix of it (creation cut short) is
    started afresh with a warning."""
    (tmp_path / LOG_NAME).write_bytes(MAGIC[:3])
    store, cap = open_store(tmp_path)
    assert len(store) == 0 and len(cap.warnings()) == 1
    store.close()
    assert (tmp_path / LOG_NAME).read_bytes() == MAGIC


# -- damage in the middle ------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["crc", "length0", "length1", "length2", "length3", "kind", "id", "time", "body"],
)
def test_damaged_middle_record_is_skipped(tmp_path: Path, where: str) -> None:
    """A byte flipped in a middle record's crc, length field or payload loses only that
    record: every record before and after is kept, the warning names the offset, the
    damaged file is copied aside and the log is rewritten clean."""
    messages = [msg(i) for i in range(6)]
    offsets = write_log(tmp_path, messages)
    bad = 2
    position = {
        "crc": 1,
        "length0": 4,
        "length1": 5,
        "length2": 6,
        "length3": 7,
        "kind": 8,
        "id": 12,
        "time": 30,
        "body": 40,
    }[where]
    flip(tmp_path / LOG_NAME, offsets[bad] + position)
    damaged = (tmp_path / LOG_NAME).read_bytes()
    store, cap = open_store(tmp_path)
    expected = messages[:bad] + messages[bad + 1 :]
    assert contents(store) == expected
    for m in expected:
        assert store.get(m.id) == m
    assert messages[bad].id not in store
    (warning,) = [w for w in cap.warnings() if "skipped" in w]
    size = offsets[bad + 1] - offsets[bad]
    assert f"{size} bytes at offset {offsets[bad]} skipped" in warning
    (copy,) = tmp_path.glob(f"{LOG_NAME}.damaged-*")
    assert copy.read_bytes() == damaged
    assert (tmp_path / LOG_NAME).read_bytes() == MAGIC + b"".join(map(encode_record, expected))
    store.add(msg(50))
    store.close()
    store, cap = open_store(tmp_path)
    assert contents(store) == [*expected, msg(50)]
    assert cap.warnings() == []
    store.close()


def test_damage_across_read_chunk_boundaries(tmp_path: Path) -> None:
    """In a log several times recovery's 1 MiB read chunk, damaged records around the
    chunk boundaries (and records that cross them) are skipped and every other record,
    a near-maximum-size one included, is kept."""
    rng = random.Random(3)
    messages = [msg(i, size=rng.randrange(2000, 9000)) for i in range(400)]
    big = b"B" * (MAX_RECORD_BYTES - 100)
    messages.insert(150, Message(message_id(big), big, 1.0, (1,)))
    offsets = write_log(tmp_path, messages)
    ends = [*offsets[1:], (tmp_path / LOG_NAME).stat().st_size]
    bad = {
        k
        for boundary in (1 << 20, 3 << 20)
        for k in range(len(messages))
        if offsets[k] < boundary < ends[k]
    }
    bad.add(len(messages) // 3 * 2)
    assert len(bad) == 3
    for k in bad:
        flip(tmp_path / LOG_NAME, ends[k] - 1)
    store, cap = open_store(tmp_path)
    assert contents(store) == [m for k, m in enumerate(messages) if k not in bad]
    assert len([w for w in cap.warnings() if "skipped" in w]) == len(bad)
    store.close()


class CountingCrc:
    """Stands in for the log module's ``zlib``: counts the calls and bytes of crc32."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    def crc32(self, data: bytes, value: int = 0) -> int:
        self.calls += 1
        self.bytes += len(data)
        return zlib.crc32(data, value)


CRAFTED = {
    # Every other offset reads as a header of a 65,537-byte record: past the body.
    "long": b"\x01\x00" * (16 * 1024),
    # Every 4th offset reads as a header of a 16,385-byte record: many inside the body.
    "short": b"\x01@\x00\x00" * (8 * 1024),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_skipping_damage_through_crafted_bodies_computes_no_checksum_per_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A record whose header is damaged and whose 32 KiB body is crafted so that at
    thousands of its offsets a possible record header begins (length, kind 1 and a path
    that fit) is skipped without a checksum over each of those would-be records. With
    forged lengths reaching past the body ("long"), recovery computes one checksum per
    record and two more, over less than twice the file in all (before: one 64 KiB
    checksum per other offset, 1 GiB); with forged records inside the body ("short"),
    the checksums of waiting candidates stop at their budget (before: 128 MiB). Every
    other record is kept and the skipped bytes are reported at the damaged record."""
    crafted = CRAFTED[kind]
    evil = Message(message_id(crafted), crafted, 1.0, (2,))
    messages = [msg(0), evil, *(msg(i, size=900) for i in range(1, 120))]
    offsets = write_log(tmp_path, messages)
    header = offsets[1] + 8 + 1 + 16 + 8 + 2 + 4  # where the body starts
    assert _forged_headers(tmp_path / LOG_NAME, header, len(crafted)) >= 8_000
    flip(tmp_path / LOG_NAME, offsets[1])  # the crc: the record no longer checks out
    size = (tmp_path / LOG_NAME).stat().st_size
    counter = CountingCrc()
    monkeypatch.setattr(recovery_module, "zlib", counter)
    store, cap = open_store(tmp_path)
    monkeypatch.undo()
    print(f"\ncrafted damage ({kind}): {counter.calls} checksums over {counter.bytes} bytes")
    if kind == "long":
        assert counter.calls <= len(messages) + 2
        assert counter.bytes < 2 * size
    else:
        assert counter.bytes < 2 * size + log_module._WAITING_CHECK_BYTES + (64 << 10)
    assert contents(store) == [m for m in messages if m is not evil]
    (warning,) = [w for w in cap.warnings() if "skipped" in w]
    assert f"{offsets[2] - offsets[1]} bytes at offset {offsets[1]} skipped" in warning
    store.close()


def _forged_headers(path: Path, start: int, n: int) -> int:
    """How many offsets in file bytes [start, start+n) begin a record header whose length,
    kind and path count are all possible and whose record fits in the file."""
    data = path.read_bytes()
    count = 0
    for q in range(start, start + n):
        length = struct.unpack_from("<I", data, q + 4)[0]
        kind, count_path = data[q + 8], struct.unpack_from("<H", data, q + 33)[0]
        fits = q + 8 + length <= len(data)
        if 27 <= length <= MAX_RECORD_BYTES and kind == 1 and 27 + 4 * count_path <= length:
            count += fits
    return count


@pytest.mark.parametrize("count", [6, 4], ids=["records-after", "last-damaged"])
def test_intact_record_followed_by_damage_is_kept_when_found_by_a_skip(
    tmp_path: Path, count: int
) -> None:
    """Records 1 and 3 have a damaged header (record 3: its kind byte, so record 2 is
    not followed by a possible header, as a forged record would not be): the skip past
    record 1 still finds record 2 and keeps it, and every record after record 3 too
    (with 4 records, record 3 is the last and is cut as a torn tail)."""
    messages = [msg(i) for i in range(count)]
    offsets = write_log(tmp_path, messages)
    flip(tmp_path / LOG_NAME, offsets[1])
    flip(tmp_path / LOG_NAME, offsets[3] + 8)
    store, cap = open_store(tmp_path)
    assert contents(store) == [m for k, m in enumerate(messages) if k not in (1, 3)]
    skipped = [w for w in cap.warnings() if "skipped" in w]
    assert f"{offsets[2] - offsets[1]} bytes at offset {offsets[1]} skipped" in skipped[0]
    store.close()


def test_add_refuses_a_record_over_the_size_bound(tmp_path: Path) -> None:
    """A message whose record would exceed MAX_RECORD_BYTES is refused, not written."""
    store, _ = open_store(tmp_path)
    body = b"x" * MAX_RECORD_BYTES
    with pytest.raises(ValueError):
        store.add(Message(message_id(body), body, 0.0, ()))
    assert len(store) == 0 and store.stats()["file_bytes"] == len(MAGIC)
    store.close()


def test_record_whose_id_does_not_match_its_body_is_corrupt(tmp_path: Path) -> None:
    """A record with a valid checksum but an id that is not the hash of its body is
    skipped like any damaged record."""
    liar = Message(message_id(b"something else"), b"not that", 1.0, ())
    payload = encode_record(liar)[8:]
    length = struct.pack("<I", len(payload))
    forged = struct.pack("<I", zlib.crc32(length + payload)) + length + payload
    (tmp_path / LOG_NAME).write_bytes(
        MAGIC + encode_record(msg(1)) + forged + encode_record(msg(2))
    )
    store, cap = open_store(tmp_path)
    assert contents(store) == [msg(1), msg(2)]
    assert any("skipped" in w for w in cap.warnings())
    store.close()


@pytest.mark.parametrize(
    "tail",
    [b"\x00" * 300, "bad-crc-then-garbage"],
    ids=["zero-filled", "bad-crc-then-garbage"],
)
def test_unexplained_tail_is_cut_but_copied_aside(tmp_path: Path, tail: bytes | str) -> None:
    """Tail bytes that are more than one torn append (a zero-filled tail, or a record
    with a bad checksum followed by bytes that are no record) are cut off like damage:
    the records before them are kept and the file is copied aside first."""
    messages = [msg(i) for i in range(4)]
    offsets = write_log(tmp_path, messages)
    path = tmp_path / LOG_NAME
    if isinstance(tail, bytes):
        path.write_bytes(path.read_bytes() + tail)
        kept, bad_at = messages, offsets[-1] + len(encode_record(messages[-1]))
    else:
        flip(path, offsets[-1] + 30)
        path.write_bytes(path.read_bytes() + b"\x07" * 50)
        kept, bad_at = messages[:-1], offsets[-1]
    store, cap = open_store(tmp_path)
    assert contents(store) == kept
    assert any(f"at offset {bad_at} skipped" in w for w in cap.warnings())
    assert len(list(tmp_path.glob(f"{LOG_NAME}.damaged-*"))) == 1
    store.close()


def test_damage_after_open_is_an_error_not_a_wrong_message(tmp_path: Path) -> None:
    """A record damaged on disk while the store is open makes get and scan raise
    StoreError instead of returning something that was not written."""
    messages = [msg(i) for i in range(3)]
    offsets = write_log(tmp_path, messages)
    store, _ = open_store(tmp_path)
    flip(tmp_path / LOG_NAME, offsets[1] + 40)
    assert store.get(messages[0].id) == messages[0]
    with pytest.raises(StoreError, match=f"offset {offsets[1]}"):
        store.get(messages[1].id)
    with pytest.raises(StoreError):
        list(store.scan(0))
    store.close()


def test_wrong_magic_refuses_to_start_and_leaves_the_file(tmp_path: Path) -> None:
    """A file that is not a gossip log: one-line StoreError naming it, file untouched,
    directory not left locked."""
    data = b"NOT A LOG AT ALL\n" * 4
    (tmp_path / LOG_NAME).write_bytes(data)
    for _ in range(2):  # the second attempt must not say "in use"
        with pytest.raises(StoreError) as e:
            open_store(tmp_path)
        text = str(e.value)
        assert str(tmp_path / LOG_NAME) in text and "\n" not in text and "magic" in text
    assert (tmp_path / LOG_NAME).read_bytes() == data


@cache
def base_log() -> tuple[bytes, tuple[Message, ...], tuple[int, ...]]:
    messages = tuple(msg(i, size=10 + 7 * i) for i in range(8))
    records = [encode_record(m) for m in messages]
    offsets, pos = [], len(MAGIC)
    for r in records:
        offsets.append(pos)
        pos += len(r)
    return MAGIC + b"".join(records), messages, tuple(offsets)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=4),
    cut=st.none() | st.integers(0, 2000),
)
def test_random_corruption_never_returns_what_was_not_written(
    flips: list[tuple[int, int]], cut: int | None
) -> None:
    """Random flipped bytes and truncation: open raises nothing but StoreError for a bad
    magic; otherwise it returns only written records, in written order, keeps every
    record whose bytes were untouched, and a second open finds the same, cleanly."""
    data, messages, offsets = base_log()
    buf = bytearray(data)
    touched = set()
    for pos, mask in flips:
        pos %= len(buf)
        buf[pos] ^= mask
        touched.add(pos)
    end = len(buf) if cut is None else cut % (len(buf) + 1)
    damaged = bytes(buf[:end])
    with tempfile.TemporaryDirectory() as d:
        directory = Path(d)
        (directory / LOG_NAME).write_bytes(damaged)
        good_magic = damaged[:8] == MAGIC or (len(damaged) < 8 and MAGIC.startswith(damaged))
        try:
            store, _ = open_store(directory)
        except StoreError:
            assert not good_magic
            event("bad magic")
            return
        assert good_magic
        got = contents(store)
        event(f"records lost: {len(messages) - len(got)}")
        event(f"damaged copy: {bool(list(directory.glob('*.damaged-*')))}")
        written = list(messages)
        # A subsequence of what was written, in order.
        it = iter(written)
        assert all(any(m == w for w in it) for m in got)
        if damaged[:8] == MAGIC:
            ends = [*offsets[1:], len(data)]
            for m, start, stop in zip(messages, offsets, ends, strict=True):
                intact = stop <= end and not any(start <= t < stop for t in touched)
                if intact:
                    assert m in got
        store.close()
        store, cap = open_store(directory)
        assert contents(store) == got
        assert cap.warnings() == []
        store.close()


# -- crash safety ------------------------------------------------------------------------------

CHILD = r"""
import sys
from pathlib import Path

from gossip.core.message import Message, message_id
from gossip.store import log as log_module
from gossip.store.log import LogStore

directory, policy, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = sys.stdout


def make(i):
    body = (f"round {rnd} message {i} " + "z" * (i % 300)).encode()
    return Message(message_id(body), body, float(i), (rnd, i % 65536))


def ack(_, m, i):
    out.write(f"{m.id.hex()} {rnd} {i}\n")
    out.flush()


store = LogStore.open(Path(directory), fsync=policy)
if policy == "always":
    out.write("ready\n")
    out.flush()
    i = 0
    while True:
        m = make(i)
        store.add(m)
        ack(None, m, i)
        i += 1
else:
    from twisted.internet import reactor

    state = [0]

    def step():
        for _ in range(20):
            i = state[0]
            state[0] += 1
            m = make(i)
            store.add(m)
            store.when_durable().addCallback(ack, m, i)
        reactor.callLater(0.0005, step)

    def start():
        out.write("ready\n")
        out.flush()
        step()

    reactor.callWhenRunning(start)
    reactor.run()
"""

_BODY = re.compile(rb"round (\d+) message (\d+) (z*)")


def expected_message(rnd: int, i: int) -> Message:
    body = (f"round {rnd} message {i} " + "z" * (i % 300)).encode()
    return Message(message_id(body), body, float(i), (rnd, i % 65536))


def kill_after(directory: Path, policy: str, rnd: int, delay: float) -> list[tuple[str, int, int]]:
    """Run the appending child, SIGKILL it ``delay`` s after it is ready; its acks."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), policy, str(rnd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout = proc.stdout
    chunks: list[bytes] = []
    # Drain stdout while the child runs: a full pipe would block it in write().
    reader = threading.Thread(target=lambda: chunks.extend(iter(stdout.readline, b"")))
    try:
        ready = stdout.readline()
        assert ready == b"ready\n", proc.stderr.read().decode()
        reader.start()
        threading.Event().wait(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        reader.join(10)
        out = b"".join(chunks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    acks = []
    for line in out.split(b"\n")[:-1]:  # a last line without its newline was not acked
        hexid, r, i = line.decode().split()
        acks.append((hexid, int(r), int(i)))
    return acks


def check_after_crash(directory: Path, acked: list[tuple[str, int, int]]) -> None:
    store, _ = open_store(directory)
    try:
        for hexid, rnd, i in acked:
            m = store.get(bytes.fromhex(hexid))
            assert m == expected_message(rnd, i)
        seen = set()
        for m in store.scan(0):
            match = _BODY.fullmatch(m.body)
            assert match is not None, m
            assert m == expected_message(int(match[1]), int(match[2]))
            assert m.id not in seen
            seen.add(m.id)
        assert len(seen) == len(store) >= len(acked)
    finally:
        store.close()


@pytest.mark.parametrize("policy", ["always", "batch"])
def test_sigkill_loses_no_acknowledged_message(tmp_path: Path, policy: str) -> None:
    """A child appends and acknowledges each message once add (always) or when_durable
    (batch) returned; killed with SIGKILL at random moments, over several rounds on the
    same directory, the reopened log holds every acknowledged message with its body and
    nothing that was not written."""
    rng = random.Random(f"sigkill-{policy}")
    acked: list[tuple[str, int, int]] = []
    for rnd in range(4):
        new = kill_after(tmp_path, policy, rnd, rng.uniform(0.05, 0.5))
        assert new, "the child acknowledged nothing"
        acked += new
        check_after_crash(tmp_path, acked)


# -- locking ----------------------------------------------------------------------------------


def test_second_open_of_a_directory_is_refused(tmp_path: Path) -> None:
    """Two stores cannot share a data directory: the second open gets a one-line
    StoreError; once the first is closed the directory opens again."""
    first, _ = open_store(tmp_path)
    with pytest.raises(StoreError) as e:
        open_store(tmp_path)
    assert str(e.value) == f"data directory {tmp_path} is in use by another process"
    first.close()
    second, _ = open_store(tmp_path)
    second.close()


def test_lock_is_held_against_other_processes(tmp_path: Path) -> None:
    """Another process opening the same directory gets the in-use error."""
    store, _ = open_store(tmp_path)
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from gossip.store.log import LogStore;"
                "LogStore.open(Path(sys.argv[1]), fsync='never')",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    finally:
        store.close()
    assert r.returncode == 1
    assert "is in use by another process" in r.stderr


def test_ids_from_gives_arrival_order_before_and_after_reopen(tmp_path: Path) -> None:
    """ids_from pages the ids in the order they were added, the same order scan() and a
    reopened log give, for both stores."""
    store, _ = open_store(tmp_path, reactor=Clock())
    memory = MemoryStore()
    messages = [msg(i) for i in (5, 3, 9, 1, 7, 2)]
    for m in messages:
        store.add(m)
        memory.add(m)
    ids = [m.id for m in messages]
    for s in (store, memory):
        assert s.ids_from(0, 100) == ids
        assert s.ids_from(2, 3) == ids[2:5]
        assert s.ids_from(6, 3) == [] and s.ids_from(-1, 1) == ids[:1]
        assert [m.id for m in s.scan(0)] == ids
    store.close()
    store, _ = open_store(tmp_path)
    assert store.ids_from(0, 100) == ids and list(store.ids()) == ids
    store.close()


@pytest_twisted.ensureDeferred
async def test_batch_fsyncs_records_nobody_waits_for_and_counts_them_durable(
    tmp_path: Path,
) -> None:
    """Relayed messages have no waiter, yet under "batch" an fsync covers them soon
    (group commit, not one fsync per record); durable_count follows the fsyncs and
    never counts a record no fsync has covered."""
    synced: list[int] = []

    def recording_fsync(fd: int) -> None:
        os.fsync(fd)
        synced.append(1)

    store, _ = open_store(tmp_path, fsync="batch", fsync_function=recording_fsync)
    try:
        for i in range(200):
            store.add(msg(i))
        assert store.durable_count() == 0 and synced == []
        deadline = reactor.seconds() + 5
        while store.durable_count() < 200 and reactor.seconds() < deadline:
            await deferLater(reactor, 0.001, lambda: None)
        assert store.durable_count() == 200
        assert 1 <= len(synced) <= 2
        store.add(msg(200))
        assert store.durable_count() == 200
    finally:
        store.close()
    store, _ = open_store(tmp_path, fsync="batch")
    assert store.durable_count() == 201
    store.close()
    memory, never = MemoryStore(), open_store(tmp_path / "n", fsync="never")[0]
    for s in (memory, never):
        s.add(msg(1))
        assert s.durable_count() == 1
    never.close()


@pytest_twisted.ensureDeferred
async def test_batch_fsync_runs_inline_while_fast_and_in_a_thread_once_slow(
    tmp_path: Path,
) -> None:
    """A fast fsync runs in the reactor thread (no thread round trip); one that takes
    longer than inline_fsync_below moves the next ones to a thread, so a slow disk
    stalls the reactor for one fsync at most; fast again a few times (the 50 ms
    estimate halves per fsync: 25, 12.5 ms, then under 10), they come back inline."""
    threads: list[str] = []
    delays = [0.0, 0.05, 0.0, 0.0, 0.0, 0.0]

    def timed_fsync(fd: int) -> None:
        threads.append(threading.current_thread().name)
        time.sleep(delays[len(threads) - 1] if len(threads) <= len(delays) else 0.0)

    store, _ = open_store(
        tmp_path, fsync="batch", fsync_function=timed_fsync, inline_fsync_below=0.01
    )
    main = threading.current_thread().name
    try:
        for i in range(6):
            store.add(msg(i))
            await store.when_durable()
        assert threads[0] == main and threads[1] == main  # the slow one was inline too
        assert main not in threads[2:5]  # after it: a thread until the estimate is low
        assert threads[5] == main  # fast three times: inline again
    finally:
        store.close()


# -- group commit pacing (gossip/store/fsync_pacing.py) --------------------------


def test_pacer_syncs_at_once_when_quiet_and_leaves_a_gap_after_each_batch() -> None:
    """The next fsync is due at the end of the turn unless the last one covered more
    than one append and ended less than GAP_FACTOR times its own duration ago; the
    wait is capped; fsyncs stay inline while the disk wait (not the wall time) is
    under the threshold, and after a slow one come back inline only once the disk has
    been fast a few times (the estimate halves per fsync)."""
    pacer = FsyncPacer(max_delay=0.01, inline_below=0.002)
    assert pacer.delay(100.0) == 0.0 and pacer.inline()
    pacer.done(100.0, 0.001, 0.001, appends=2)
    gap = GAP_FACTOR * 0.001
    assert pacer.delay(100.0) == pytest.approx(gap)
    assert pacer.delay(100.0 + gap / 2) == pytest.approx(gap / 2)
    assert pacer.delay(100.0 + gap) == 0.0
    pacer.done(150.0, 0.005, 0.0001, appends=2)  # slow only for want of a CPU: still inline
    assert pacer.inline()
    pacer.done(200.0, 0.010, 0.010, appends=2)  # a slow disk: wait at most max_delay, a thread
    assert pacer.delay(200.0) == pytest.approx(0.01) and not pacer.inline()
    # Fast again: the 10 ms estimate halves per fsync (5, 2.5, 1.25 ms): inline after 3.
    for k in range(3):
        assert not pacer.inline()
        pacer.done(300.0 + k, 0.0001, 0.0001, appends=2)
    assert pacer.inline()


def test_pacer_leaves_no_gap_after_an_fsync_of_one_append() -> None:
    """An fsync that covered one append (nothing came while the node synced it) says
    the node is quiet: the next record is synced at the end of its turn however long
    that fsync took. A gap would batch nothing and only delay it (at 50 messages a
    second on a busy machine, a 5 to 30 ms inline fsync held the next message's frame,
    and the gap after it then held that message 3 ms more at about one node in ten)."""
    pacer = FsyncPacer(max_delay=0.004, inline_below=0.002)
    pacer.done(100.0, 0.010, 0.001, appends=1)
    assert pacer.delay(100.0) == 0.0
    pacer.done(101.0, 0.010, 0.001, appends=3)  # a batch: the node is busy, the gap is back
    assert pacer.delay(101.0) == pytest.approx(0.004)


def test_pacer_gap_ends_at_most_max_delay_after_the_last_fsync() -> None:
    """The gap after a slow fsync (a busy machine stretches one to 10 ms) ends at most
    max_delay after that fsync: a record that comes later, on a quiet node, is synced
    at once instead of waiting max_delay more (at 50 messages a second every message
    waited 4 ms so)."""
    pacer = FsyncPacer(max_delay=0.004, inline_below=0.002)
    pacer.done(100.0, 0.010, 0.001, appends=2)
    assert pacer.delay(100.0) == pytest.approx(0.004)  # right after it: the capped gap
    assert pacer.delay(100.003) == pytest.approx(0.001)
    assert pacer.delay(100.006) == 0.0


@pytest_twisted.ensureDeferred
async def test_batch_fsync_starts_after_the_reactor_wrote_what_the_read_queued(
    tmp_path: Path,
) -> None:
    """A read that appends a record and writes a frame (a node forwarding what it
    received) gets its frame onto the socket before the fsync runs: Twisted writes
    queued bytes in its next poll, after the timed calls due, and an inline fsync due
    at the end of the read's turn used to run first and hold the forwarded frame for as
    long as the disk took, at every hop. Real reactor and sockets; the fsync peeks at
    the peer's end of the socket."""
    ours, theirs = socket.socketpair()
    seen: list[bytes] = []

    def peeking_fsync(fd: int) -> None:
        try:
            seen.append(theirs.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            seen.append(b"")
        os.fsync(fd)

    store, _ = open_store(
        tmp_path, fsync="batch", fsync_function=peeking_fsync, inline_fsync_below=1.0
    )
    durable: list[Deferred[None]] = []

    class Relay(Protocol):
        def dataReceived(self, data: bytes) -> None:
            store.add(msg(len(durable)))
            self.transport.write(b"forwarded " + data)
            durable.append(store.when_durable())

    factory = Factory.forProtocol(Relay)
    reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
    ours.close()  # the reactor holds its own duplicate
    try:
        for k in range(3):
            theirs.sendall(b"frame %d" % k)
            await wait_until(lambda k=k: len(durable) > k)
            await durable[k]
            assert seen[-1].endswith(b"forwarded frame %d" % k)
            theirs.recv(64)
    finally:
        theirs.close()
        store.close()


class InlineThreads:
    """A thread pool whose jobs run when the test says (``run_next``), and a Clock that
    takes the results as the reactor does (``callFromThread``)."""

    def __init__(self, clock: Clock) -> None:
        self.jobs: list[Callable[[], None]] = []
        clock.getThreadPool = lambda: self  # type: ignore[attr-defined]
        clock.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:
        self.jobs.append(lambda: on_result(True, f(*args)))

    def run_next(self) -> None:
        self.jobs.pop(0)()


def test_fsync_after_a_threaded_one_that_left_records_waiting_waits_for_the_io_pass() -> None:
    """When an fsync that ran in a thread ends and records appended meanwhile have
    waiters, the next fsync starts on a later reactor pass, not inside the completion:
    the completion runs in the timed-call pass, right after the poll that read those
    records, and the frames that read queued are written in the next poll only; an
    fsync started at once would hold them (it used to, behind every such fsync)."""
    clock = Clock()
    threads = InlineThreads(clock)
    appended = [10]
    prepared: list[int] = []

    log_fd = os.open(os.devnull, os.O_RDONLY)

    def prepare() -> tuple[int, int] | None:
        prepared.append(appended[0])
        return log_fd, appended[0]

    commit = GroupCommit(
        reactor=clock,
        fsync_function=lambda fd: None,
        max_delay=0.004,
        inline_below=0.0,  # every fsync in a "thread"
        durable=0,
        prepare=prepare,
        failed=StoreError,
        appended=lambda: appended[0],
        path="log",
    )
    first = commit.wait(10)
    clock.advance(0)
    assert prepared == [10] and len(threads.jobs) == 1
    appended[0] = 20  # a read appends while the fsync is in flight, and a client waits
    second = commit.wait(20)
    threads.run_next()
    assert first.called and not second.called
    assert prepared == [10], "the next fsync started inside the completion"
    clock.advance(0)
    assert prepared == [10, 20]
    threads.run_next()
    assert second.called
    os.close(log_fd)


def test_batch_fsync_of_a_quiet_store_runs_at_the_end_of_the_turn_and_paces_under_load(
    tmp_path: Path,
) -> None:
    """On a quiet store the record added in a turn is durable when the turn ends (no
    fixed wait), also right after an fsync of one record; right after an fsync that
    covered several appends and took d seconds, the next waits GAP_FACTOR * d (here at
    most batch_interval, 20 ms)."""
    clock = Clock()
    store = inline_batch_store(tmp_path, clock, fsync_seconds=0.003, batch_interval=0.02)
    try:
        store.add(msg(1))
        d1 = store.when_durable()
        clock.advance(0)
        clock.advance(0)
        assert d1.called and store.stats()["fsyncs"] == 1
        store.add(msg(2))  # right after an fsync of one record: no gap
        store.add(msg(3))
        d2 = store.when_durable()
        clock.advance(0)
        clock.advance(0)
        assert d2.called and store.stats()["fsyncs"] == 2
        store.add(msg(4))  # right after an fsync of two appends: the gap
        d3 = store.when_durable()
        clock.advance(0)
        clock.advance(0.011)
        assert not d3.called  # the last fsync took 3 ms: wait at least 12 ms
        # at most 20 ms (a loaded machine stretches the 3 ms sleep): 11 + 9 ms would
        # fall short of 0.02 by a float's rounding
        clock.advance(0.0095)
        assert d3.called and store.stats()["fsyncs"] == 3
    finally:
        store.close()


def test_batch_fsync_right_after_a_slow_fsync_of_one_record_starts_at_the_end_of_the_turn(
    tmp_path: Path,
) -> None:
    """A relayed record that arrives while the reactor is held by a slow inline fsync
    of the previous one (a busy machine: 5 to 30 ms) is synced at once when it is read,
    not after a gap of up to batch_interval: nothing else came, so waiting batches
    nothing. A watcher waits, as the node's Watch does."""
    clock = Clock()
    store = inline_batch_store(tmp_path, clock, fsync_seconds=0.01, batch_interval=0.004)
    try:
        store.add(msg(1))
        clock.advance(0)
        clock.advance(0)
        assert store.stats()["fsyncs"] == 1
        store.add(msg(2))  # read right after that fsync ended
        d = store.when_durable()
        clock.advance(0)
        clock.advance(0)
        assert d.called and store.stats()["fsyncs"] == 2
    finally:
        store.close()


def test_batch_fsync_slowed_only_by_a_busy_cpu_stays_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync whose wall time passed the inline threshold only because its thread was
    waiting for a CPU (the kernel's run-queue time) is not a slow disk: the next fsync
    still runs in the reactor thread instead of paying a thread round trip."""
    queued = [0.0]  # the fake run-queue time: all of the fsync's sleep, however long
    monkeypatch.setattr(fsync_pacing, "run_queue_seconds", lambda: queued[0])
    threads: list[str] = []

    def descheduled_fsync(fd: int) -> None:
        threads.append(threading.current_thread().name)
        started = time.monotonic()
        time.sleep(0.05)  # stands for 50 ms without a CPU (the fake run-queue says so)
        queued[0] += time.monotonic() - started

    clock = Clock()
    store, _ = open_store(tmp_path, reactor=clock, fsync="batch", fsync_function=descheduled_fsync)
    try:
        for i in range(2):
            store.add(msg(i))
            d = store.when_durable()
            clock.advance(0.01)
            assert d.called
        assert threads == [threading.current_thread().name] * 2
    finally:
        store.close()


def test_batch_fsync_in_the_reactor_thread_syncs_the_log_descriptor_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline fsync syncs the log's own descriptor: no duplicate made and closed
    around each one (two system calls per message at low rate). One in a thread syncs
    a private duplicate, closed after, and the log's descriptor stays open."""
    synced: list[tuple[int, bool]] = []  # (descriptor, whether it is the log's own)
    dups: list[int] = []
    real_dup = os.dup

    def counting_dup(fd: int) -> int:
        copy = real_dup(fd)
        dups.append(copy)
        return copy

    monkeypatch.setattr(os, "dup", counting_dup)
    clock = Clock()
    threads = InlineThreads(clock)
    store, _ = open_store(
        tmp_path,
        reactor=clock,
        fsync="batch",
        fsync_function=lambda fd: synced.append((fd, fd == store._fd)),
        inline_fsync_below=1.0,
    )
    try:
        store.add(msg(1))
        d = store.when_durable()
        clock.advance(0)
        clock.advance(0)
        assert d.called and synced == [(store._fd, True)] and dups == []
        store._commit._pacer.inline_below = 0.0  # the disk turned slow: thread from now on
        store.add(msg(2))
        d = store.when_durable()
        clock.advance(0)
        clock.advance(0)
        threads.run_next()
        assert d.called and len(dups) == 1 and synced[1] == (dups[0], False)
        with pytest.raises(OSError):
            os.fstat(dups[0])  # the duplicate was closed after its fsync
        os.fstat(store._fd)
    finally:
        store.close()


def test_a_fast_fsync_reads_the_run_queue_time_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run-queue time is read after an fsync only when the fsync took long enough
    for it to matter (the inline threshold): a faster one waited less than that for the
    disk in any case. One read of /proc per fsync instead of two."""
    reads: list[int] = []

    def counted() -> float:
        reads.append(1)
        return 0.0

    monkeypatch.setattr(fsync_pacing, "run_queue_seconds", counted)
    clock = Clock()
    store, _ = open_store(
        tmp_path,
        reactor=clock,
        fsync="batch",
        fsync_function=lambda fd: None,
        inline_fsync_below=1.0,
    )
    try:
        for i in range(3):
            store.add(msg(i))
            d = store.when_durable()
            clock.advance(0)
            clock.advance(0)
            assert d.called
        assert store.stats()["fsyncs"] == 3 and len(reads) == 3
    finally:
        store.close()
    assert fsync_pacing.timed_sync(lambda fd: time.sleep(0.002), -1, 0.001)[0] >= 0.002
    assert len(reads) == 5  # a slow one: read before and after


def test_record_offsets_take_4_bytes_until_the_log_passes_4_gib(tmp_path: Path) -> None:
    """The store keeps each record's offset in 4 bytes (part of its memory per message)
    while every offset fits, after a fresh start and after recovery, and widens them to
    8, values kept, once the log's data reaches past 4 GiB (too big to write here: the
    widening itself is checked)."""
    body = b"offsets"
    store = LogStore.open(tmp_path, fsync="never", reactor=Clock())
    try:
        store.add(Message(message_id(body), body, 1.0, (1,)))
        assert store._offsets.itemsize == 4
    finally:
        store.close()
    store = LogStore.open(tmp_path, fsync="never", reactor=Clock())
    try:
        assert store._offsets.itemsize == 4 and len(store._offsets) == 1
    finally:
        store.close()
    end = recovery_module.NARROW_END
    narrow = recovery_module.offset_array(end, [0, 5, end - 1])
    assert narrow.itemsize == 4
    assert recovery_module.fit_offsets(narrow, end) is narrow
    wide = recovery_module.fit_offsets(narrow, end + 1)
    assert wide.itemsize == 8 and list(wide) == [0, 5, end - 1]
    wide.append(1 << 40)
    assert recovery_module.offset_array(end + 1).itemsize == 8
    with pytest.raises(OverflowError):
        narrow.append(end + 1)
