"""The ids a store holds, numbered in arrival order: ``in`` and ``add_id`` at set speed.

Both stores (``log.py``, ``memory.py``) keep this one index; what they keep
beside it per position (a file offset, a ``Message``) is theirs. ``x in store``
runs for every copy and every announcement a node receives (about 2.6 times per
stored message on the throughput benchmark), and ``add_id`` for every message
stored, so both are one C-level ``set`` operation plus what a Python call costs;
a frame's ids go in with ``add_ids`` and are checked with ``holds_any`` and
``holds_all``: a few set and list operations for the whole frame.
The index keeps the caller's id objects, shared by its parts:

* ``_held``: a ``set`` of the ids: membership, and the duplicate check of
  ``add_id``. Python's ``hash`` of ``bytes`` is keyed SipHash (random per
  process), so a client cannot grind ids into one slot.
* ``_ids``: a ``list`` of the same objects in arrival order (position n at
  index n): ``ids_from``, ``id_at`` and ``ids`` slice it and return the objects
  themselves.
* Id order (``ids_between``) and ``position``: buckets of positions
  (``array('I')``) by id prefix, split one at a time as the index grows (linear
  hashing), so no add ever rehashes everything. Ids are uniform hashes, so the
  buckets stay even (about ``RANGE_LOAD`` ids each): a range query sorts only
  the buckets it covers, and ``position`` (a ``get`` by id: graft replies,
  re-sync serving, client lookups; not per copy) scans one bucket. New ids join
  them in batches (``_fold``: at the next ``ids_between`` or ``position``, or
  once ``FOLD_BOUND`` wait), which keeps that work off ``add_id``.

Memory per id at 1,000,000 ids: the ``bytes`` object (49 bytes, 64 with
pymalloc's rounding), its ``set`` slot (16 bytes in a table kept under 60% full:
about 34 bytes), its ``list`` slot (8) and its position in a bucket (4, plus the
buckets' slack): about 115 bytes, under the 150 a node may spend per message
with the log's offsets. (The packed table this replaced held no object per id,
about 55 bytes, but a lookup was a Python-level hash, index and ``bytes.find``:
several times slower.) Measured with ``gossip-bench-store --memory 1000000``
and ``--index`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress

from gossip.core.message import ID_BYTES

MAX_POSITIONS = 1 << 32  # positions are stored as u32 in the id-order buckets
# Average ids per id-order bucket before one more is split: ``position`` scans
# about this many.
RANGE_LOAD = 64
# Ids are put in id order in batches, off the path of every add: when an
# ids_between or position asks, or once this many wait.
FOLD_BOUND = 4096

# The id-order buckets are chosen by the first 64 bits of the id (2**64 buckets: never);
# beside its position, a bucket keeps the id's last byte (see position).
_PREFIX_TAIL = struct.Struct(f">Q{ID_BYTES - 9}xB")
_PREFIX_BITS = 64


class IdIndex:
    """Ids numbered 0, 1, ... in the order added; see the module docstring.

    The stores subclass it rather than hold one: ``x in store`` is then a single
    Python call (it runs for every copy a node receives). Its names do not clash
    with the ``MessageStore`` methods: ``__contains__``, ``__len__``, ``ids``,
    ``ids_from`` and ``ids_between`` mean the same for both.
    """

    __slots__ = (
        "_fold_at",
        "_held",
        "_ids",
        "_ranged",
        "_ranges_coarse",
        "_ranges_fine",
        "_ranges_level",
        "_ranges_split",
        "_tails_coarse",
        "_tails_fine",
    )

    def __init__(self, source: IdIndex | None = None) -> None:
        """An empty index, or one that takes over what ``source`` holds (``source``
        must not be used after)."""
        if source is not None:
            for name in IdIndex.__slots__:
                setattr(self, name, getattr(source, name))
            return
        self._held: set[bytes] = set()
        self._ids: list[bytes] = []
        # Id order: linear hashing on id prefixes. Buckets of prefix length
        # _ranges_level in _ranges_coarse (those from _ranges_split on), of one bit more
        # in _ranges_fine (the first 2 * _ranges_split). Beside each bucket of
        # positions, the last byte of each of its ids, in the same order (_tails_*).
        self._ranges_coarse: list[array[int] | None] = [array("I")]
        self._ranges_fine: list[array[int]] = []
        self._tails_coarse: list[bytearray | None] = [bytearray()]
        self._tails_fine: list[bytearray] = []
        self._ranges_level = 0
        self._ranges_split = 0
        self._ranged = 0  # positions below are in the id-order buckets (see _fold)
        self._fold_at = FOLD_BOUND - 1  # the position whose add folds first (see add_id)

    # -- reading -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._held

    def holds_any(self, mids: Iterable[bytes]) -> bool:
        """Whether any of ``mids`` is held: one C-level set operation for a frame's ids
        (nearly always none of a received frame's, and a copy costs a lookup each)."""
        return not self._held.isdisjoint(mids)

    def holds_all(self, mids: Iterable[bytes]) -> bool:
        """Whether every one of ``mids`` is held (what an IHave names, nearly always)."""
        return self._held.issuperset(mids)

    def position(self, mid: bytes) -> int | None:
        """The arrival position of ``mid``, or None when it is not held."""
        if len(mid) != ID_BYTES:
            return None
        if self._ranged < len(self._ids):
            self._fold()
        # _range_bucket, inline. The bucket's ids are scattered in memory; their last
        # bytes are not: one find, and (nearly always) one id compared.
        top = int.from_bytes(mid[:8], "big")
        level = self._ranges_level
        p = top >> (_PREFIX_BITS - level)
        if p < self._ranges_split:
            p = top >> (_PREFIX_BITS - level - 1)
            positions, tails = self._ranges_fine[p], self._tails_fine[p]
        else:
            positions, tails = self._ranges_coarse[p], self._tails_coarse[p]  # type: ignore[assignment]
        ids, tail = self._ids, mid[-1]
        i = tails.find(tail)
        while i >= 0:
            q = positions[i]
            if ids[q] == mid:
                return q
            i = tails.find(tail, i + 1)
        return None

    def id_at(self, position: int) -> bytes:
        return self._ids[position]

    def ids_from(self, start: int, limit: int) -> list[bytes]:
        """Up to ``limit`` ids in arrival order from position ``start``."""
        start = max(start, 0)
        return self._ids[start : start + max(limit, 0)]

    def ids(self) -> Iterator[bytes]:
        """Every id in arrival order, as held when this is called."""
        return iter(self._ids[:])

    def ids_between(self, lo: bytes, hi: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` held ids in [lo, hi), in id order. ``hi`` may be longer
        than an id (17 bytes: past the top of the id space)."""
        if limit <= 0 or lo >= hi or not self._ids:
            return []
        if self._ranged < len(self._ids):
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
        at = self._ids.__getitem__
        out: list[bytes] = []
        for p in range(first, last + 1):
            if p < split:
                parts: tuple[array[int], ...] = (fine[2 * p], fine[2 * p + 1])
            else:
                part = coarse[p]
                assert part is not None
                parts = (part,)
            for positions in parts:
                found = list(map(at, positions))
                if p in (first, last):  # the buckets between lie wholly in range
                    found = [mid for mid in found if lo <= mid < hi]
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
        The index keeps ``mid`` itself (bytes are immutable).
        """
        held = self._held
        if mid in held:
            return None
        if len(mid) != ID_BYTES:
            raise ValueError(f"a message id has {ID_BYTES} bytes, got {len(mid)}")
        ids = self._ids
        pos = len(ids)
        if pos >= self._fold_at:
            self._grow(pos)
        held.add(mid)
        ids.append(mid)
        return pos

    def add_ids(self, mids: Sequence[bytes]) -> list[int] | None:
        """``add_id`` of each of ``mids`` in order (the new messages of a frame). None
        when all were new and numbered at once: the usual frame, with a few C-level set
        and list operations and no Python call per id. Else (some held or repeated, or
        the batch reaches the next fold) one ``add_id`` each, and the rows of ``mids``
        that were new. Raises as ``add_id`` does; the ids numbered before that stay
        (the caller takes them back with ``truncate_ids``)."""
        fresh = set(mids)
        n = len(mids)
        ids = self._ids
        if (
            len(fresh) == n
            and len(ids) + n <= self._fold_at
            and self._held.isdisjoint(fresh)
            and all(map(ID_BYTES.__eq__, map(len, mids)))
        ):
            self._held |= fresh
            ids += mids
            return None
        positions = list(map(self.add_id, mids))
        return [row for row, pos in enumerate(positions) if pos is not None]

    def _grow(self, pos: int) -> None:
        """Before position ``pos`` is taken: refuse it past ``MAX_POSITIONS``, and fold
        the ids added since the last fold into id order once ``FOLD_BOUND`` wait."""
        if pos >= MAX_POSITIONS:
            raise ValueError(f"an index holds at most {MAX_POSITIONS} ids")
        if pos + 1 - self._ranged >= FOLD_BOUND:
            self._fold()
        self._fold_at = min(self._ranged + FOLD_BOUND - 1, MAX_POSITIONS)

    def _fold(self) -> None:
        """Put the ids from position ``_ranged`` on into their id-order buckets: in
        runs between two bucket splits, each a tight loop (``_range_bucket`` inline)."""
        ids = self._ids
        end = len(ids)
        q = self._ranged
        while q < end:
            split, coarse, fine = self._ranges_split, self._ranges_coarse, self._ranges_fine
            coarse_tails, fine_tails = self._tails_coarse, self._tails_fine
            due = RANGE_LOAD * (len(coarse) + split)  # the position that splits one more
            stop = min(end, due + 1)
            coarse_shift = _PREFIX_BITS - self._ranges_level
            fine_shift = coarse_shift - 1
            chunk = b"".join(ids[q:stop])
            for n, (top, tail) in enumerate(_PREFIX_TAIL.iter_unpack(chunk), q):
                p = top >> coarse_shift
                if p < split:
                    p = top >> fine_shift
                    fine[p].append(n)
                    fine_tails[p].append(tail)
                else:
                    coarse[p].append(n)
                    coarse_tails[p].append(tail)
            q = stop
            if q > due:
                self._split_range()
        self._ranged = end

    def truncate_ids(self, count: int) -> list[bytes]:
        """Forget every id from position ``count`` on; return them (arrival order)."""
        count = max(count, 0)
        ids = self._ids
        gone = ids[count:]
        self._held.difference_update(gone)
        for n in range(count, min(self._ranged, len(ids))):
            positions, tails = self._range_bucket(int.from_bytes(ids[n][:8], "big"))
            i = positions.index(n)
            del positions[i], tails[i]
        del ids[count:]
        self._ranged = min(self._ranged, count)
        self._fold_at = min(self._fold_at, self._ranged + FOLD_BOUND - 1)
        return gone

    # -- internals -----------------------------------------------------------

    def _range_bucket(self, top: int) -> tuple[array[int], bytearray]:
        """The id-order bucket (positions, last bytes) of the id whose first 64 bits
        are ``top``."""
        level = self._ranges_level
        p = top >> (_PREFIX_BITS - level)
        if p < self._ranges_split:
            p = top >> (_PREFIX_BITS - level - 1)
            return self._ranges_fine[p], self._tails_fine[p]
        positions, tails = self._ranges_coarse[p], self._tails_coarse[p]
        assert positions is not None and tails is not None
        return positions, tails

    def _split_range(self) -> None:
        """Split id-order bucket ``_ranges_split`` in two by the next bit of the ids."""
        level, p = self._ranges_level, self._ranges_split
        if level >= _PREFIX_BITS - 1:
            return  # 2**63 buckets: never reached
        old, old_tails = self._ranges_coarse[p], self._tails_coarse[p]
        assert old is not None and old_tails is not None
        ids, byte, mask = self._ids, level >> 3, 0x80 >> (level & 7)
        high_bits = [ids[q][byte] & mask for q in old]
        low_bits = [not bit for bit in high_bits]
        low, high = array("I", compress(old, low_bits)), array("I", compress(old, high_bits))
        low_tails = bytearray(compress(old_tails, low_bits))
        high_tails = bytearray(compress(old_tails, high_bits))
        self._ranges_fine += (low, high)
        self._tails_fine += (low_tails, high_tails)
        self._ranges_coarse[p] = self._tails_coarse[p] = None
        self._ranges_split = p + 1
        if self._ranges_split == 1 << level:
            self._ranges_coarse, self._ranges_fine = list(self._ranges_fine), []
            self._tails_coarse, self._tails_fine = list(self._tails_fine), []
            self._ranges_level = level + 1
            self._ranges_split = 0
