"""A node's per-origin repair state (``Plumtree``), as columns over the graph's origins.

A node keeps, per origin, who stands in for its tree parent, who it pushes to besides
the tree, who told it they are cut off, and so on. After a crash most nodes hold such
entries for most origins (a crashed origin's cut-off news reaches every node), so as
dicts of sets that state was about n**2 objects in a simulation of n nodes: 1.6 GB at
2,000 nodes, some 40 GB projected at 10,000. A column holds one small code per origin
instead (a byte while fewer than 256 distinct values are in use) into a table of the
distinct values: for one node, a few subsets of its few neighbours. It is allocated at
the first entry and freed with the last, so a node with no such state pays nothing.

Columns are keyed by the origins of one graph (``ShortestPathTrees.ids`` and
``index``); ``rekey`` moves them to another graph's, forgetting origins not in it.
They iterate in ascending origin id; every reader sorts or does not depend on order.
"""

from __future__ import annotations

from array import array
from collections.abc import (
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    MutableSet,
    Sequence,
)
from itertools import compress
from typing import TypeVar, overload

V = TypeVar("V")
D = TypeVar("D")

# The widest code a bytearray holds; more distinct values widen the column to 32 bits.
BYTE_CODES = 255
_NO_DEFAULT = object()


class OriginColumn(MutableMapping[int, V]):
    """origin -> value (never None), for the origins of one graph (setting any other
    is a KeyError)."""

    __slots__ = ("_codes", "_ids", "_index", "_key", "_len", "_spare", "_uses", "_values")

    def __init__(self, ids: Sequence[int], index: Mapping[int, int]) -> None:
        self._ids = ids  # origin index -> origin
        self._index = index  # origin -> its index
        self._codes: bytearray | array[int] | None = None  # by origin index; 0: no value
        self._reset()

    def _reset(self) -> None:
        self._codes = None
        self._values: list[V | None] = [None]  # by code
        self._uses = [0]  # by code: origins holding it
        self._key: dict[V, int] = {}  # value -> its code
        self._spare: list[int] = []  # codes no origin holds
        self._len = 0

    # -- reads ---------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        codes = self._codes
        return iter(()) if codes is None else compress(self._ids, codes)

    def __contains__(self, origin: object) -> bool:
        codes = self._codes
        i = None if codes is None else self._index.get(origin)  # type: ignore[call-overload]
        return i is not None and codes[i] != 0  # type: ignore[index]

    def __getitem__(self, origin: int) -> V:
        value = self.get(origin)
        if value is None:
            raise KeyError(origin)
        return value

    @overload
    def get(self, origin: int, /) -> V | None: ...
    @overload
    def get(self, origin: int, default: V | D, /) -> V | D: ...
    def get(self, origin: int, default: object = None) -> object:
        codes = self._codes
        if codes is None:
            return default
        i = self._index.get(origin)
        if i is None:
            return default
        code = codes[i]
        return self._values[code] if code else default

    @overload
    def pop(self, origin: int, /) -> V: ...
    @overload
    def pop(self, origin: int, default: V | D, /) -> V | D: ...
    def pop(self, origin: int, default: object = _NO_DEFAULT) -> object:
        value = self.get(origin)
        if value is None:
            if default is _NO_DEFAULT:
                raise KeyError(origin)
            return default
        self.pop_code(origin)
        return value

    # -- writes --------------------------------------------------------------

    def __setitem__(self, origin: int, value: V) -> None:
        i = self._index[origin]
        codes = self._codes
        if codes is None:
            codes = self._codes = bytearray(len(self._ids))
        old = codes[i]
        code = self._key.get(value)
        if code is None:
            code = self._new_code(value)
            codes = self._codes
            assert codes is not None
        if code == old:
            return
        codes[i] = code
        self._uses[code] += 1
        if old:
            self._release(old)
        else:
            self._len += 1

    def __delitem__(self, origin: int) -> None:
        if not self.pop_code(origin):
            raise KeyError(origin)

    def pop_code(self, origin: int) -> int:
        """Remove ``origin``'s value if it has one; return its code (0: had none)."""
        codes = self._codes
        i = None if codes is None else self._index.get(origin)
        if i is None:
            return 0
        assert codes is not None
        old = codes[i]
        if old:
            codes[i] = 0
            self._len -= 1
            self._release(old)
            if not self._len:
                self._reset()
        return old

    def clear(self) -> None:
        self._reset()

    def rekey(self, ids: Sequence[int], index: Mapping[int, int]) -> None:
        """Key the column by another graph's origins; values of origins not in it go."""
        if index is self._index:
            return
        codes, old_ids = self._codes, self._ids
        self._ids, self._index = ids, index
        if codes is None:
            return
        moved = bytearray(len(ids)) if isinstance(codes, bytearray) else array("I", [0]) * len(ids)
        self._codes = moved
        for i in compress(range(len(codes)), codes):
            j = index.get(old_ids[i])
            if j is None:
                self._len -= 1
                self._release(codes[i])
            else:
                moved[j] = codes[i]
        if not self._len:
            self._reset()

    def _new_code(self, value: V) -> int:
        if self._spare:
            code = self._spare.pop()
            self._values[code] = value
        else:
            code = len(self._values)
            self._values.append(value)
            self._uses.append(0)
            if code > BYTE_CODES and isinstance(self._codes, bytearray):
                self._codes = array("I", iter(self._codes))  # a bytearray would be raw bytes
        self._key[value] = code
        return code

    def _release(self, code: int) -> None:
        uses = self._uses[code] - 1
        self._uses[code] = uses
        if not uses:
            del self._key[self._values[code]]  # type: ignore[arg-type]
            self._values[code] = None
            self._spare.append(code)


class PeerSets(OriginColumn[frozenset[int]]):
    """origin -> the peers it is marked for (never empty: the last one removed
    removes the origin)."""

    __slots__ = ()

    def __setitem__(self, origin: int, value: Iterable[int]) -> None:
        peers = frozenset(value)
        if peers:
            super().__setitem__(origin, peers)
        else:
            self.pop_code(origin)

    def has(self, origin: int, peer: int) -> bool:
        # ``get`` inlined: the repair rules ask this millions of times after a crash.
        codes = self._codes
        if codes is None:
            return False
        i = self._index.get(origin)
        if i is None:
            return False
        code = codes[i]
        return code != 0 and peer in self._values[code]  # type: ignore[operator]

    def add(self, origin: int, peer: int) -> None:
        peers = self.get(origin)
        if peers is None:
            self[origin] = (peer,)
        elif peer not in peers:
            self[origin] = peers | {peer}

    def discard(self, origin: int, peer: int) -> None:
        peers = self.get(origin)
        if peers is not None and peer in peers:
            self[origin] = peers - {peer}

    def holding(self, peer: int) -> list[int]:
        """The origins marked for ``peer``, ascending."""
        wanted = {code for code, peers in enumerate(self._values) if peers and peer in peers}
        if not wanted:
            return []
        return [origin for origin, code in self._coded() if code in wanted]

    def discard_everywhere(self, peer: int) -> None:
        for origin in self.holding(peer):
            self.discard(origin, peer)

    def _coded(self) -> Iterator[tuple[int, int]]:
        codes = self._codes
        if codes is None:
            return iter(())
        return zip(compress(self._ids, codes), [c for c in codes if c], strict=True)


class OriginSet(MutableSet[int]):
    """A set of origins of one graph (adding any other is a KeyError), a byte each."""

    __slots__ = ("_flags", "_ids", "_index", "_len")

    def __init__(self, ids: Sequence[int], index: Mapping[int, int]) -> None:
        self._ids = ids
        self._index = index
        self._flags: bytearray | None = None
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        flags = self._flags
        return iter(()) if flags is None else compress(self._ids, flags)

    def __contains__(self, origin: object) -> bool:
        flags = self._flags
        i = None if flags is None else self._index.get(origin)  # type: ignore[call-overload]
        return i is not None and flags[i] != 0  # type: ignore[index]

    def add(self, origin: int) -> None:
        i = self._index[origin]
        flags = self._flags
        if flags is None:
            flags = self._flags = bytearray(len(self._ids))
        if not flags[i]:
            flags[i] = 1
            self._len += 1

    def discard(self, origin: int) -> None:
        flags = self._flags
        i = None if flags is None else self._index.get(origin)
        if i is not None and flags[i]:  # type: ignore[index]
            flags[i] = 0  # type: ignore[index]
            self._len -= 1
            if not self._len:
                self._flags = None

    def clear(self) -> None:
        self._flags = None
        self._len = 0

    def rekey(self, ids: Sequence[int], index: Mapping[int, int]) -> None:
        """Key the set by another graph's origins; origins not in it go."""
        if index is self._index:
            return
        kept = [o for o in self if o in index]
        self._ids, self._index = ids, index
        self.clear()
        for origin in kept:
            self.add(origin)

    @classmethod
    def _from_iterable(cls, it: Iterable[int]) -> set[int]:  # type: ignore[override]
        return set(it)  # what the set operators (``a - b``) return
