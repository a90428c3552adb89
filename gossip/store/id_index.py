"""The ids a store holds, numbered in arrival order, in about 30 bytes per id.

Both stores (``log.py``, ``memory.py``) keep this one index; what they keep
beside it per position (a file offset, a ``Message``) is theirs. A Python
``dict`` of ``bytes`` ids costs over 150 bytes per id (a 64-byte object per id
and per position number, plus the table); this index holds no object per id:

* ``_ids``: one ``bytearray`` of the 16-byte ids in arrival order (position n
  at bytes ``16n``..``16n+16``): ``ids_from`` and ``id_at`` slice it.
* Membership (``__contains__``, ``position``): a hash table by linear hashing
  whose buckets are ``bytes`` of 20-byte entries (id, position as u32): a
  ``bytes`` object holds its data inline, one cache miss fewer per lookup than a
  ``bytearray``, and without spare capacity; an add replaces its bucket.
  The bucket is chosen by ``hash(id)``, Python's keyed SipHash (random per
  process), so a client cannot grind ids into one bucket; a lookup is one
  ``bytes.find`` over about ``LOAD`` entries, at C speed. The table grows by
  splitting one bucket at a time (linear hashing), so no add ever rehashes
  everything.
* Id order (``ids_between``): buckets of positions (``array('I')``) by id
  prefix, also split one at a time as the index grows; a range query sorts only
  the buckets it covers. Ids are uniform hashes, so the buckets stay even. New
  ids join them in batches (``_fold``: at the next ``ids_between``, or once
  ``FOLD_BOUND`` wait), which keeps that work off ``add_id``.

Measured with ``gossip-bench-store --memory 1000000`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator

from gossip.core.message import ID_BYTES

ENTRY_BYTES = ID_BYTES + 4  # id, position (u32 little-endian)
MAX_POSITIONS = 1 << 32  # positions are stored as u32
# Average entries per membership bucket before one more bucket is split off: a
# lookup scans about this many entries (320 bytes) with one find.
LOAD = 16
# Average ids per id-order bucket before one more is split.
RANGE_LOAD = 32
# Ids are put in id order in batches, off the path of every add: when an
# ids_between asks, or once this many wait.
FOLD_BOUND = 4096

_POS = struct.Struct("<I")
# The id-order buckets are chosen by the first 64 bits of the id (2**64 buckets: never).
_PREFIX = struct.Struct(f">Q{ID_BYTES - 8}x")
_PREFIX_BITS = 64


class IdIndex:
    """Ids numbered 0, 1, ... in the order added; see the module docstring.

    The stores subclass it rather than hold one: ``x in store`` is then a single
    Python call (it runs for every copy a node receives). Its names do not clash
    with the ``MessageStore`` methods: ``__contains__``, ``__len__``, ``ids``,
    ``ids_from`` and ``ids_between`` mean the same for both.
    """

    __slots__ = (
        "_buckets",
        "_grow_at",
        "_high",
        "_ids",
        "_level",
        "_low",
        "_ranged",
        "_ranges_coarse",
        "_ranges_fine",
        "_ranges_level",
        "_ranges_split",
        "_split",
    )

    def __init__(self, source: IdIndex | None = None) -> None:
        """An empty index, or one that takes over what ``source`` holds (``source``
        must not be used after)."""
        if source is not None:
            for name in IdIndex.__slots__:
                setattr(self, name, getattr(source, name))
            return
        self._ids = bytearray()
        # Membership: linear hashing. Bucket of hash h: h & _low, or h & _high when
        # that is below _split (those buckets have been split at this level).
        self._buckets: list[bytes] = [b""]
        self._level = 0
        self._split = 0
        self._low = 0
        self._high = 1
        # Id order: the same scheme on id prefixes. Buckets of prefix length
        # _ranges_level in _ranges_coarse (those from _ranges_split on), of one bit more
        # in _ranges_fine (the first 2 * _ranges_split).
        self._ranges_coarse: list[array[int] | None] = [array("I")]
        self._ranges_fine: list[array[int]] = []
        self._ranges_level = 0
        self._ranges_split = 0
        self._ranged = 0  # positions below are in the id-order buckets (see _fold)
        self._grow_at = 0  # the next position at which _grow has work

    # -- reading -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids) // ID_BYTES

    def __contains__(self, mid: bytes) -> bool:
        h = hash(mid)
        a = h & self._low
        if a < self._split:
            a = h & self._high
        bucket = self._buckets[a]
        i = bucket.find(mid)
        if i < 0:
            return False
        if i % ENTRY_BYTES == 0 and len(mid) == ID_BYTES:
            return True
        return _find_entry(bucket, mid) >= 0

    def position(self, mid: bytes) -> int | None:
        """The arrival position of ``mid``, or None when it is not held."""
        bucket = self._buckets[self._address(hash(mid))]
        i = _find_entry(bucket, mid)
        if i < 0:
            return None
        pos: int = _POS.unpack_from(bucket, i + ID_BYTES)[0]
        return pos

    def id_at(self, position: int) -> bytes:
        start = ID_BYTES * position
        return bytes(self._ids[start : start + ID_BYTES])

    def ids_from(self, start: int, limit: int) -> list[bytes]:
        """Up to ``limit`` ids in arrival order from position ``start``."""
        start = max(start, 0)
        chunk = bytes(self._ids[ID_BYTES * start : ID_BYTES * (start + max(limit, 0))])
        return [chunk[i : i + ID_BYTES] for i in range(0, len(chunk), ID_BYTES)]

    def ids(self) -> Iterator[bytes]:
        """Every id in arrival order, as held when this is called."""
        snapshot = bytes(self._ids)
        return (snapshot[i : i + ID_BYTES] for i in range(0, len(snapshot), ID_BYTES))

    def ids_between(self, lo: bytes, hi: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` held ids in [lo, hi), in id order. ``hi`` may be longer
        than an id (17 bytes: past the top of the id space)."""
        if limit <= 0 or lo >= hi or not self._ids:
            return []
        if self._ranged < len(self):
            self._fold()
        level, split = self._ranges_level, self._ranges_split
        coarse, fine = self._ranges_coarse, self._ranges_fine
        bits = 8 * ID_BYTES
        first = int.from_bytes(lo[:ID_BYTES].ljust(ID_BYTES, b"\x00"), "big")
        if len(hi) > ID_BYTES:  # every id below hi is at most its first 16 bytes
            top = int.from_bytes(hi[:ID_BYTES], "big")
        else:
            top = int.from_bytes(hi.ljust(ID_BYTES, b"\x00"), "big") - 1
            if top < 0:
                return []
        first, last = first >> (bits - level), top >> (bits - level)
        ids = self._ids
        out: list[bytes] = []
        for p in range(first, last + 1):
            if p < split:
                parts: tuple[array[int], ...] = (fine[2 * p], fine[2 * p + 1])
            else:
                part = coarse[p]
                assert part is not None
                parts = (part,)
            for positions in parts:
                found = []
                for q in positions:
                    mid = bytes(ids[ID_BYTES * q : ID_BYTES * q + ID_BYTES])
                    if lo <= mid < hi:
                        found.append(mid)
                found.sort()
                out.extend(found)
            if len(out) >= limit:
                break
        return out[:limit]

    # -- changing ------------------------------------------------------------

    def add_id(self, mid: bytes) -> int | None:
        """Number ``mid`` with the next position and return it; None if it is held.

        One call for the lookup and the insertion: the log store calls it for every
        new message (and takes the id back with ``truncate_ids`` if it cannot store it).
        """
        if len(mid) != ID_BYTES:
            raise ValueError(f"a message id has {ID_BYTES} bytes, got {len(mid)}")
        h = hash(mid)
        a = h & self._low
        if a < self._split:
            a = h & self._high
        bucket = self._buckets[a]
        i = bucket.find(mid)
        if i >= 0 and (i % ENTRY_BYTES == 0 or _find_entry(bucket, mid) >= 0):
            return None
        ids = self._ids
        pos = len(ids) // ID_BYTES
        if pos >= MAX_POSITIONS:
            raise ValueError(f"an index holds at most {MAX_POSITIONS} ids")
        self._buckets[a] = b"".join((bucket, mid, _POS.pack(pos)))
        ids += mid
        if pos >= self._grow_at:
            self._grow(pos)
        return pos

    def _grow(self, pos: int) -> None:
        """Split a hash bucket if the table has passed its load; fold the ids added
        since the last fold into id order once there are ``FOLD_BOUND`` of them."""
        if pos >= LOAD * len(self._buckets):
            self._split_bucket()
        if pos + 1 - self._ranged >= FOLD_BOUND:
            self._fold()
        self._grow_at = min(LOAD * len(self._buckets), self._ranged + FOLD_BOUND - 1)

    def _fold(self) -> None:
        """Put the ids from position ``_ranged`` on into their id-order buckets: in
        runs between two bucket splits, each a tight loop (``_range_bucket`` inline)."""
        ids = self._ids
        end = len(ids) // ID_BYTES
        q = self._ranged
        while q < end:
            split, coarse, fine = self._ranges_split, self._ranges_coarse, self._ranges_fine
            due = RANGE_LOAD * (len(coarse) + split)  # the position that splits one more
            stop = min(end, due + 1)
            coarse_shift = _PREFIX_BITS - self._ranges_level
            fine_shift = coarse_shift - 1
            chunk = ids[ID_BYTES * q : ID_BYTES * stop]
            for n, (top,) in enumerate(_PREFIX.iter_unpack(chunk), q):
                p = top >> coarse_shift
                if p < split:
                    fine[top >> fine_shift].append(n)
                else:
                    coarse[p].append(n)
            q = stop
            if q > due:
                self._split_range()
        self._ranged = end

    def truncate_ids(self, count: int) -> list[bytes]:
        """Forget every id from position ``count`` on; return them (arrival order)."""
        count = max(count, 0)
        gone = self.ids_from(count, len(self) - count)
        for j, mid in enumerate(gone):
            a = self._address(hash(mid))
            bucket = self._buckets[a]
            i = _find_entry(bucket, mid)
            self._buckets[a] = bucket[:i] + bucket[i + ENTRY_BYTES :]
            if count + j < self._ranged:
                self._range_bucket(int.from_bytes(mid[:8], "big")).remove(count + j)
        del self._ids[ID_BYTES * count :]
        self._ranged = min(self._ranged, count)
        return gone

    # -- internals -----------------------------------------------------------

    def _address(self, h: int) -> int:
        a = h & self._low
        return h & self._high if a < self._split else a

    def _split_bucket(self) -> None:
        """Linear hashing: split bucket ``_split`` by the next bit of the hash."""
        data = self._buckets[self._split]
        keep, move = bytearray(), bytearray()
        bit = 1 << self._level
        for i in range(0, len(data), ENTRY_BYTES):
            if hash(data[i : i + ID_BYTES]) & bit:
                move += data[i : i + ENTRY_BYTES]
            else:
                keep += data[i : i + ENTRY_BYTES]
        self._buckets[self._split] = bytes(keep)
        self._buckets.append(bytes(move))
        self._split += 1
        if self._split == bit:
            self._level += 1
            self._split = 0
            self._low = (1 << self._level) - 1
            self._high = (1 << (self._level + 1)) - 1

    def _range_bucket(self, top: int) -> array[int]:
        """The id-order bucket of the id whose first 64 bits are ``top``."""
        level = self._ranges_level
        p = top >> (_PREFIX_BITS - level)
        if p < self._ranges_split:
            return self._ranges_fine[top >> (_PREFIX_BITS - level - 1)]
        bucket = self._ranges_coarse[p]
        assert bucket is not None
        return bucket

    def _split_range(self) -> None:
        """Split id-order bucket ``_ranges_split`` in two by the next bit of the ids."""
        level, p = self._ranges_level, self._ranges_split
        if level >= _PREFIX_BITS - 1:
            return  # 2**63 buckets: never reached
        old = self._ranges_coarse[p]
        assert old is not None
        ids, byte, mask = self._ids, level >> 3, 0x80 >> (level & 7)
        low = array("I", [q for q in old if not ids[ID_BYTES * q + byte] & mask])
        high = array("I", [q for q in old if ids[ID_BYTES * q + byte] & mask])
        self._ranges_fine += (low, high)
        self._ranges_coarse[p] = None
        self._ranges_split = p + 1
        if self._ranges_split == 1 << level:
            self._ranges_coarse = list(self._ranges_fine)
            self._ranges_fine = []
            self._ranges_level = level + 1
            self._ranges_split = 0


def _find_entry(bucket: bytes, mid: bytes) -> int:
    """Where the entry of ``mid`` starts in ``bucket``, or -1 (matches that straddle
    two entries, or that a shorter ``mid`` makes, do not count)."""
    if len(mid) != ID_BYTES:
        return -1
    i = bucket.find(mid)
    while i >= 0 and i % ENTRY_BYTES:
        i = bucket.find(mid, i + 1)
    return i
