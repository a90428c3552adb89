"""``LogStore.add_many``: a received frame's new messages, as columns, appended with one
encoding pass (``encode_records``) and one buffered write, to the same file and index as
``add`` one at a time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gossip.core.message import Message, message_id
from gossip.store import record
from gossip.store.log import LOG_NAME, MAGIC, MAX_PATH, MAX_RECORD_BYTES, LogStore, encode_record
from gossip.store.memory import MemoryStore
from gossip.store.record import encode_records

AT = 1000.0  # when a batch arrived (one time for all its messages)

Columns = tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[tuple[int, ...], ...], float]


def msg(i: int, size: int = 40, at: float = AT) -> Message:
    body = f"message {i} ".encode() + "é".encode() * (i % 7) + b"x" * (size + i % 13)
    return Message(message_id(body), body, at, tuple(range(i % 4)))


def columns(messages: Sequence[Message]) -> Columns:
    """``messages`` (received together: one ``received_at``) as ``add_many``'s arguments."""
    times = {m.received_at for m in messages}
    assert len(times) <= 1, "a batch has one arrival time"
    return (
        tuple(m.id for m in messages),
        tuple(m.body for m in messages),
        tuple(m.path for m in messages),
        times.pop() if times else AT,
    )


def open_store(directory: Path, **kw: Any) -> LogStore:
    kw.setdefault("fsync", "never")
    return LogStore.open(directory, **kw)


def contents(store: LogStore) -> list[Message]:
    return list(store.scan(0))


def file_size(directory: Path) -> int:
    return (directory / LOG_NAME).stat().st_size


paths = st.lists(st.integers(0, 2**32 - 1), max_size=6).map(tuple)
rows = st.tuples(st.binary(min_size=1, max_size=300), st.sampled_from([(), (1,), (1, 2)]) | paths)


@given(
    batch=st.lists(rows, max_size=40),
    at=st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1.7e9, float("inf")]),
)
def test_batch_encoding_is_byte_identical_to_one_record_at_a_time(
    batch: list[tuple[bytes, tuple[int, ...]]], at: float
) -> None:
    """For any batch (any bodies, paths shared or not, of any length, any arrival time),
    ``encode_records`` gives exactly the bytes of ``encode_record`` for each message in
    turn, and where each record starts: the log format does not depend on how the
    records were written."""
    messages = [Message(message_id(body), body, at, path) for body, path in batch]
    ids, bodies, paths_, _ = columns(messages)
    data, starts = encode_records(ids, bodies, paths_, at)
    records = [encode_record(m) for m in messages]
    assert data == b"".join(records)
    assert starts == [sum(map(len, records[:k])) for k in range(len(records))]


ENCODABLE = Message(message_id(b"ok"), b"ok", AT, (1,))
UNENCODABLE = {
    "short id": Message(message_id(b"b")[:15], b"b", AT, ()),
    "long id": Message(message_id(b"b") + b"!", b"b", AT, ()),
    "long path": Message(message_id(b"b"), b"b", AT, (1,) * (MAX_PATH + 1)),
    "path entry over u32": Message(message_id(b"b"), b"b", AT, (2**32,)),
    "negative path entry": Message(message_id(b"b"), b"b", AT, (-1,)),
    "record too large": Message(message_id(b"b"), b"b" * MAX_RECORD_BYTES, AT, ()),
}


@pytest.mark.parametrize("case", sorted(UNENCODABLE))
@pytest.mark.parametrize("alone", [True, False])
def test_batch_encoding_refuses_what_one_record_refuses(case: str, alone: bool) -> None:
    """A message ``encode_record`` refuses (ValueError) makes ``encode_records`` refuse
    its batch, whether alone in it or among messages it would take."""
    bad = UNENCODABLE[case]
    with pytest.raises(ValueError):
        encode_record(bad)
    batch = [bad] if alone else [ENCODABLE, bad, ENCODABLE]
    with pytest.raises(ValueError):
        encode_records(*columns(batch))


def test_batch_encoding_refuses_columns_of_unequal_length() -> None:
    """Columns that are not parallel are a caller's bug, refused rather than cut short."""
    with pytest.raises(ValueError, match="columns"):
        encode_records((ENCODABLE.id,), (b"ok", b"ok"), ((1,),), AT)


def test_encoded_paths_kept_between_batches_are_bounded() -> None:
    """The bytes of paths are kept between batches, but never more than ``_PATHS_KEPT``
    of them, however many distinct paths come; records stay what ``encode_record``
    gives."""
    messages = [Message(message_id(b"p%d" % i), b"p%d" % i, AT, (i, 7)) for i in range(5000)]
    for k in range(0, len(messages), 100):
        data, _ = encode_records(*columns(messages[k : k + 100]))
        assert data == b"".join(map(encode_record, messages[k : k + 100]))
        assert len(record._PATHS) <= record._PATHS_KEPT


@pytest.mark.parametrize("policy", ["never", "batch", "always"])
def test_add_many_writes_what_add_writes(tmp_path: Path, policy: str) -> None:
    """Batches (copies of held messages and repeats inside a batch among them) leave the
    same file, the same arrival order, ids and lookups as adding each message alone;
    add_many returns how many were new, and every record survives a reopen."""
    clock = Clock()
    messages = [msg(i) for i in range(20)]
    batches = [messages[0:5], messages[3:9], [messages[9], messages[9]], messages[10:20], []]
    one = open_store(tmp_path / "one", reactor=clock, fsync=policy)
    many = open_store(tmp_path / "many", reactor=clock, fsync=policy)
    for batch in batches:
        new = sum(one.add(m) for m in batch)
        assert many.add_many(*columns(batch)) == new
        assert contents(many) == contents(one)
    assert [many.get(m.id) for m in messages] == messages
    assert many.ids_between(b"", b"\xff" * 17, 100) == one.ids_between(b"", b"\xff" * 17, 100)
    clock.advance(0)
    assert (
        (tmp_path / "many/messages.log").read_bytes()
        == (tmp_path / "one/messages.log").read_bytes()
        == MAGIC + b"".join(map(encode_record, messages))
    )
    for store in (one, many):
        store.close()
    again = open_store(tmp_path / "many")
    assert contents(again) == messages
    again.close()


def test_a_log_written_both_ways_recovers_whole(tmp_path: Path) -> None:
    """One log appended to by ``add`` (one record at a time) and by ``add_many`` (batches
    of one and more, arrival times of their own), across reopens, reads back every
    message in order, and a reopen appends after them: recovery reads either alike."""
    messages = [msg(i, at=AT + i // 5) for i in range(30)]
    store = open_store(tmp_path)
    for m in messages[:5]:
        store.add(m)
    store.close()
    store = open_store(tmp_path)
    assert store.add_many(*columns(messages[5:10])) == 5
    assert store.add_many(*columns(messages[10:11])) == 1
    store.add(messages[11])
    store.close()
    store = open_store(tmp_path)
    assert contents(store) == messages[:12]
    assert store.add_many(*columns(messages[15:20])) == 5
    store.add(messages[12])
    store.close()
    store = open_store(tmp_path)
    assert contents(store) == [*messages[:12], *messages[15:20], messages[12]]
    assert [store.get(m.id) for m in messages[15:20]] == messages[15:20]
    assert store.stats()["duplicates_at_open"] == 0
    store.close()


def test_add_many_is_one_buffered_write_per_turn(tmp_path: Path) -> None:
    """A batch is readable at once and reaches the file at the end of the turn."""
    clock = Clock()
    store = open_store(tmp_path, reactor=clock)
    messages = tuple(msg(i) for i in range(8))
    assert store.add_many(*columns(messages)) == 8
    assert file_size(tmp_path) == len(MAGIC)
    assert store.get(messages[5].id) == messages[5]  # a read writes the buffer out first
    assert file_size(tmp_path) == len(MAGIC) + sum(len(encode_record(m)) for m in messages)
    store.close()


@pytest.mark.parametrize("case", sorted(UNENCODABLE))
def test_add_many_takes_nothing_when_one_message_cannot_be_encoded(
    tmp_path: Path, case: str
) -> None:
    """A message without a record makes add_many raise ValueError before any message of
    the batch is taken: the index, the file and later batches are as if it never came."""
    store = open_store(tmp_path, reactor=Clock())
    held = msg(0)
    store.add(held)
    with pytest.raises(ValueError):
        store.add_many(*columns((msg(1), UNENCODABLE[case], msg(2))))
    assert len(store) == 1 and msg(1).id not in store and msg(2).id not in store
    assert store.stats()["file_bytes"] == len(MAGIC) + len(encode_record(held))
    assert store.add_many(*columns((msg(1), msg(2)))) == 2
    assert contents(store) == [held, msg(1), msg(2)]
    store.close()


def test_memory_store_takes_the_same_batches() -> None:
    """MemoryStore.add_many takes the columns as LogStore's does: the new messages in
    order (not held ones, nor a repeat), each read back as the ``Message`` it was; an
    id of the wrong length leaves none of the batch taken."""
    store = MemoryStore()
    messages = [msg(i) for i in range(10)]
    store.add(messages[2])
    assert store.add_many(*columns([messages[0], messages[1], messages[2], messages[1]])) == 2
    assert store.add_many(*columns(messages[3:10])) == 7
    assert store.add_many(*columns([])) == 0
    order = [messages[2], messages[0], messages[1], *messages[3:10]]
    assert list(store.scan(0)) == order and list(store.scan(8)) == order[8:]
    assert [store.get(m.id) for m in messages] == messages
    with pytest.raises(ValueError):
        store.add_many(*columns([msg(20), UNENCODABLE["short id"]]))
    assert len(store) == 10 and msg(20).id not in store
    assert store.stats()["records"] == store.durable_count() == 10
