"""The id index both stores share (gossip/store/id_index.py): membership, arrival
positions, id-order ranges, forgetting a tail, and its memory per id."""

from __future__ import annotations

import bisect
import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from test_log_store_batch import columns

from gossip.core.message import Message, message_id
from gossip.store.id_index import IdIndex
from gossip.store.log import LOG_NAME, MAGIC, LogStore, encode_record
from gossip.store.memory import MemoryStore

TOP = b"\xff" * 16 + b"\x00"  # past every id, as id_range and key_range give it


def random_ids(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    ids = [rng.randbytes(16) for _ in range(n)]
    return [*ids, bytes(16), b"\xff" * 16]  # the two ends of the id space


def test_ids_are_numbered_in_arrival_order_and_found_again() -> None:
    """Each new id gets the next position; a repeat gets None and changes nothing;
    every id added is found (``in``, ``position``, ``id_at``), other ids are not."""
    ids = random_ids(5000)
    index = IdIndex()
    for n, mid in enumerate(ids):
        assert index.add_id(mid) == n
    assert index.add_id(ids[17]) is None and len(index) == len(ids)
    assert all(mid in index for mid in ids)
    assert [index.position(mid) for mid in ids] == list(range(len(ids)))
    assert [index.id_at(n) for n in (0, 17, len(ids) - 1)] == [ids[0], ids[17], ids[-1]]
    others = random_ids(2000, seed=2)[:-2]
    assert not any(mid in index for mid in others)
    assert all(index.position(mid) is None for mid in others)
    assert index.ids_from(10, 5) == ids[10:15] and index.ids_from(len(ids) - 1, 9) == ids[-1:]
    assert list(index.ids()) == ids


def test_add_ids_numbers_a_batch_as_add_id_would_one_at_a_time() -> None:
    """``add_ids`` gives every id of a batch the position ``add_id`` would, in order:
    an all-new batch at once (None), one with held or repeated ids by rows (the new
    ones), and batches that reach a fold keep ``position`` and ``ids_between`` right;
    ``holds_any`` and ``holds_all`` answer for a batch as ``in`` does for each."""
    ids = random_ids(9000)
    index, one_by_one = IdIndex(), IdIndex()
    rows_seen = []
    for start in range(0, len(ids), 45):
        batch = tuple(ids[start : start + 45])
        if start % 450 == 90:  # a copy of a held id, and a repeat, within the batch
            batch = (ids[3], *batch[:10], batch[5], *batch[10:])
        rows = index.add_ids(batch)
        expected = [one_by_one.add_id(mid) for mid in batch]
        if rows is None:
            assert None not in expected
        else:
            assert rows == [row for row, pos in enumerate(expected) if pos is not None]
            rows_seen.append(rows)
    assert rows_seen  # the batches with copies took the row-by-row way
    assert index.ids_from(0, len(ids)) == one_by_one.ids_from(0, len(ids)) == ids
    assert [index.position(mid) for mid in ids] == list(range(len(ids)))
    assert index.ids_between(bytes(16), TOP, len(ids)) == sorted(ids)
    others = random_ids(50, seed=3)[:-2]
    assert index.holds_all(ids[100:200]) and index.holds_any([*others, ids[7]])
    assert not index.holds_any(others) and not index.holds_all([ids[1], others[0]])


def test_add_ids_refuses_a_short_id_and_the_caller_can_take_the_batch_back() -> None:
    """A batch with an id of the wrong length raises as ``add_id`` does; the ids
    numbered before it are taken back with ``truncate_ids`` (the stores' all or
    nothing), leaving the index as it was."""
    ids = random_ids(100)
    index = IdIndex()
    assert index.add_ids(ids[:50]) is None
    with pytest.raises(ValueError, match="16 bytes"):
        index.add_ids((ids[60], ids[61], b"short"))
    index.truncate_ids(50)
    assert len(index) == 50 and ids[60] not in index and not index.holds_any(ids[50:])
    assert index.add_ids(ids[50:]) is None and index.ids_from(0, 200) == ids


def test_only_whole_ids_match_never_a_part_or_a_straddle() -> None:
    """Only whole ids are held: a part of one, or 16 bytes made of the end of one id
    and the start of the next (as a packed table would hold them), is not (and a
    short id cannot be added)."""
    ids = random_ids(300)
    index = IdIndex()
    for mid in ids:
        index.add_id(mid)
    entry = ids[5] + (5).to_bytes(4, "little") + ids[6]
    for probe in (b"", ids[5][:8], ids[5][3:], entry[8:24], entry[4:20]):
        assert probe not in index and index.position(probe) is None
    with pytest.raises(ValueError, match="16 bytes"):
        index.add_id(ids[5][:8])


def test_position_tells_apart_ids_that_share_a_bucket_and_a_last_byte() -> None:
    """``position`` looks in the id's id-order bucket for its last byte, then compares
    the whole id: ids with the same prefix (one bucket) and the same last byte get
    their own positions, and an id that matches a held one in both is not held."""
    rng = random.Random(4)
    prefix, last = rng.randbytes(8), b"\x2a"
    twins = [prefix + rng.randbytes(7) + last for _ in range(40)]
    index = IdIndex()
    for mid in random_ids(3000)[:1500] + twins + random_ids(3000)[1500:]:
        index.add_id(mid)
    assert [index.position(mid) for mid in twins] == list(range(1500, 1540))
    assert index.position(prefix + rng.randbytes(7) + last) is None
    index.truncate_ids(1520)  # the last 20 twins go; the first 20 keep their positions
    assert [index.position(mid) for mid in twins] == [*range(1500, 1520), *[None] * 20]
    assert index.add_id(twins[-1]) == 1520 and index.position(twins[-1]) == 1520


def test_the_index_keeps_the_callers_id_objects() -> None:
    """The index holds the id objects it is given (one object per id, shared by its
    set and its arrival list, and with a ``MemoryStore``'s messages), not copies:
    ``ids_from``, ``ids`` and ``id_at`` give those objects back."""
    ids = random_ids(100)
    index = IdIndex()
    for mid in ids:
        index.add_id(mid)
    assert all(a is b for a, b in zip(index.ids_from(0, 200), ids, strict=True))
    assert all(a is b for a, b in zip(index.ids(), ids, strict=True))
    assert index.id_at(42) is ids[42]


def test_ids_between_answers_like_a_sorted_list() -> None:
    """Up to ``limit`` ids in [lo, hi) in id order, for random ranges (bounds of 1, 2
    and 16 bytes), the whole space (hi of 17 bytes), empty and reversed ranges, while
    the index grows through many bucket splits."""
    rng = random.Random(3)
    index = IdIndex()
    held: list[bytes] = []
    for batch in range(6):
        for mid in random_ids(900 * batch + 50, seed=10 + batch):
            if index.add_id(mid) is not None:
                held.append(mid)
        ordered = sorted(held)
        for _ in range(150):
            a, b = sorted(rng.randbytes(rng.choice([1, 2, 16])) for _ in range(2))
            limit = rng.choice([0, 1, 7, 100, 10**6])
            expect = ordered[bisect.bisect_left(ordered, a) : bisect.bisect_left(ordered, b)]
            assert index.ids_between(a, b, limit) == expect[:limit]
            assert index.ids_between(b, a, limit) == []
        assert index.ids_between(bytes(16), TOP, len(held) + 1) == ordered
        assert index.ids_between(bytes(16), b"\xff" * 16, len(held)) == ordered[:-1]


def test_truncate_forgets_the_tail_everywhere() -> None:
    """``truncate(k)`` returns the ids from position k on and forgets them in every
    view (membership, ranges, arrival order); they can be added again after."""
    ids = random_ids(4000)
    index = IdIndex()
    for mid in ids:
        index.add_id(mid)
    gone = index.truncate_ids(2500)
    assert gone == ids[2500:] and len(index) == 2500
    assert not any(mid in index for mid in gone)
    assert all(mid in index for mid in ids[:2500])
    assert index.ids_between(bytes(16), TOP, 10**6) == sorted(ids[:2500])
    assert list(index.ids()) == ids[:2500]
    assert index.add_id(gone[0]) == 2500 and gone[0] in index


def test_memory_store_answers_through_the_index() -> None:
    """MemoryStore on the shared index: get, scan, ids_from and ids_between agree
    with the messages added; add_many adds each new one once, in order."""
    store = MemoryStore()
    messages = [Message(message_id(b"m%d" % i), b"m%d" % i, float(i), (i,)) for i in range(300)]
    batch = [Message(m.id, m.body, 0.0, m.path) for m in (*messages[:10], messages[3])]
    assert store.add_many(*columns(batch)) == 10
    messages[:10] = batch[:10]
    for m in messages[10:]:
        store.add(m)
    assert not store.add(messages[0])
    assert [store.get(m.id) for m in messages] == messages
    assert list(store.scan(290)) == messages[290:]
    assert store.ids_from(5, 3) == [m.id for m in messages[5:8]]
    assert store.ids_between(bytes(16), TOP, 1000) == sorted(m.id for m in messages)


def test_log_store_index_costs_under_120_bytes_per_message(tmp_path: Path) -> None:
    """Opening a log of 100,000 messages allocates under 120 bytes per message (Python's
    own count, tracemalloc; 111 measured) for everything kept in memory: per message the
    id object (49 bytes), its slot in a set (about 42 at this size, 34 at a million),
    its slot in the arrival list (8), the record offset (4) and its place in id order
    (about 7). The packed index before it took about 55 but answered ``in`` several
    times slower. ``gossip-bench-store --memory`` measures the resident figure (under
    150 wanted)."""
    n = 100_000
    with open(tmp_path / LOG_NAME, "wb") as f:
        f.write(MAGIC)
        for i in range(n):
            body = b"message %d" % i
            f.write(encode_record(Message(message_id(body), body, 1.0, (1, 2))))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = LogStore.open(tmp_path, fsync="never")
        per_message = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    try:
        assert len(store) == n
        print(f"\nindex memory: {per_message:.1f} bytes per message")
        assert per_message < 120
    finally:
        store.close()


def test_bench_store_memory_mode_reports_both_phases(tmp_path: Path) -> None:
    """``gossip-bench-store --memory N`` runs the add and the reopen phase each in a
    child process, checks that both hold N messages, and prints and writes (--json)
    the RSS growth per message and the seconds of each."""
    out = tmp_path / "memory.json"
    argv = ["--memory", "3000", "--dir", str(tmp_path / "work"), "--json", str(out)]
    code = f"import sys; from gossip.bench.storage import main; sys.exit(main({argv!r}))"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "B/message" in r.stdout and "open" in r.stdout
    doc = json.loads(out.read_text())
    for phase in ("add", "open"):
        assert doc[phase]["messages"] == 3000
        assert doc[phase]["rss_after"] > 0 and doc[phase]["seconds"] > 0
