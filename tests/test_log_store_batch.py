"""``LogStore.add_many``: a received frame's new messages appended with one buffered write,
to the same file and index as ``add`` one at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from gossip.core.message import Message, message_id
from gossip.store.log import LOG_NAME, MAGIC, LogStore, encode_record


def msg(i: int, size: int = 40) -> Message:
    body = f"message {i} ".encode() + "é".encode() * (i % 7) + b"x" * (size + i % 13)
    return Message(message_id(body), body, 1000.0 + i, tuple(range(i % 4)))


def open_store(directory: Path, **kw: Any) -> LogStore:
    kw.setdefault("fsync", "never")
    return LogStore.open(directory, **kw)


def contents(store: LogStore) -> list[Message]:
    return list(store.scan(0))


def file_size(directory: Path) -> int:
    return (directory / LOG_NAME).stat().st_size


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
        assert many.add_many(tuple(batch)) == new
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


def test_add_many_is_one_buffered_write_per_turn(tmp_path: Path) -> None:
    """A batch is readable at once and reaches the file at the end of the turn."""
    clock = Clock()
    store = open_store(tmp_path, reactor=clock)
    messages = tuple(msg(i) for i in range(8))
    assert store.add_many(messages) == 8
    assert file_size(tmp_path) == len(MAGIC)
    assert store.get(messages[5].id) == messages[5]  # a read writes the buffer out first
    assert file_size(tmp_path) == len(MAGIC) + sum(len(encode_record(m)) for m in messages)
    store.close()


def test_add_many_takes_nothing_when_one_message_cannot_be_encoded(tmp_path: Path) -> None:
    """A message without a record (here an id of 8 bytes) makes add_many raise
    ValueError before any message of the batch is taken."""
    store = open_store(tmp_path)
    bad = Message(message_id(b"b")[:8], b"b", 0.0, ())
    with pytest.raises(ValueError):
        store.add_many((msg(1), bad, msg(2)))
    assert len(store) == 0 and store.stats()["file_bytes"] == len(MAGIC)
    store.close()
