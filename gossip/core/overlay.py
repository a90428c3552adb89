"""The dynamic overlay: who is in the cluster, which links are live, and which to keep.

Pure (events in, effects out; ``now`` passed in). Three parts, after their models:

- **Link state, flooded** (as OSPF floods its LSAs): every node's ``NodeRecord``
  (id, incarnation, version, peer address, the neighbours its links are up to,
  leaving) reaches every node over the peer links. A node re-floods its own record
  when its links change and every ``RECORD_REFRESH`` seconds; a record not renewed
  for ``RECORD_MAX_AGE`` is forgotten. A newer version replaces the held record and
  goes on to the other neighbours; a new link gets the whole table. A node that
  hears a record of itself newer than its own (from its previous life) numbers its
  own above it. The live graph counts an edge only when both ends' records name it.
- **Suspicion, not death** (SWIM with Lifeguard's local health): a wanted
  neighbour whose link is down is *suspect*; it is declared unreachable only when
  ``replace_after`` seconds pass with no news that it is linked (its own newer record,
  or another node's newer record naming it, restarts the wait), or when its link
  has been down ``CUT_OFF_FACTOR`` times that long whatever the news (it lives, but
  this node cannot reach it). A node whose own
  timer ran late (it was paused or overloaded) raises its local health score, which
  stretches that wait, so it does not declare its neighbours dead for its own stall.
- **Neighbour selection** (HyParView's active view): the file's neighbours are
  preferred; a node keeps ``TARGET_DEGREE`` links by dialing replacements chosen from
  the live records (degree below 3 first, then the lowest degree, then the lowest
  id); it accepts links from others up to ``max_degree``. When a preferred neighbour
  returns, the replacement that stood in for it is dropped. A node that leaves
  floods ``leaving``; its neighbours replace it at once. If the live graph falls
  apart, the lowest node of each smaller part links to the largest part.

A link is kept by the side that wants it: preferred links by both ends (both
dial), others by the node that chose them (it dials; the other end accepts and
forgets the link when it goes down).

Records are not signed: a peer that lies about others' links can steer the choice
of replacements (each record is bounded and checked; a malformed one is dropped and
counted, and never costs the link).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Protocol

from gossip.core.effects import OVERSIZED_BATCH, Dial, DropPeer, Effect, Hangup, Send
from gossip.core.frames import NodeRecord, NodeRecordsFrame

TARGET_DEGREE = 3
# Records in one NodeRecords frame (a new link gets the table in frames of this many).
RECORDS_PER_FRAME = 64
# Nodes a node keeps records of; records of more new nodes are dropped and counted.
MAX_RECORDS = 4096
# Neighbours one record may name (a static file may give a node many links).
MAX_RECORD_NEIGHBOURS = 64
# Characters of a record's peer address (an endpoint description).
MAX_ADDRESS_CHARS = 512
# Highest record version taken (a record numbered at the top could never be outdone).
MAX_VERSION = 2**62
MAX_NODE_ID = 2**31 - 1
# Seconds between refreshes of a node's own record, and after which an unrenewed
# record is forgotten.
RECORD_REFRESH = 10.0
RECORD_MAX_AGE = 4.5 * RECORD_REFRESH
# Lifeguard's local health: a tick this late counts as a missed timer (ticks come
# every 0.1 s); each raises the score by one, up to MAX_HEALTH; every HEALTH_RECOVERY
# seconds of on-time ticks lowers it by one. Suspicion waits replace_after * (1 + score).
LATE_TICK = 1.0
MAX_HEALTH = 4
HEALTH_RECOVERY = 10.0
# Recent changes of the neighbour set kept for status, newest last.
RECENT_CHANGES = 32
# A suspect others keep reporting linked is replaced anyway once its link has been
# down this many suspicion timeouts: the two are cut apart, not the node dead.
CUT_OFF_FACTOR = 3
# Seconds between the moments nodes that lost neighbours together decide (10 slots).
STAGGER_STEP = 0.05
# A node dialed as a replacement that never came up is not chosen again for this long.
FAILED_DIAL_MEMORY = RECORD_MAX_AGE

# Why a record was dropped (its link kept): the keys of ``Overlay.bad_records``.
BAD_NODE_ID = "bad_node_id"
BAD_VERSION = "bad_version"
BAD_ADDRESS = "bad_address"
BAD_NEIGHBOURS = "bad_neighbours"
TABLE_FULL = "records_table_full"
BAD_RECORD_KEYS = (BAD_NODE_ID, BAD_VERSION, BAD_ADDRESS, BAD_NEIGHBOURS, TABLE_FULL)


class GraphListener(Protocol):
    def on_graph(self, graph: Mapping[int, frozenset[int]]) -> list[Effect]: ...


def record_problem(record: NodeRecord) -> str | None:
    """Why ``record`` must be dropped (a key of ``BAD_RECORD_KEYS``), or None."""
    if not 0 <= record.node <= MAX_NODE_ID:
        return BAD_NODE_ID
    if not 1 <= record.version <= MAX_VERSION:
        return BAD_VERSION
    if not record.address or len(record.address) > MAX_ADDRESS_CHARS:
        return BAD_ADDRESS
    nbs = record.neighbours
    if (
        len(nbs) > MAX_RECORD_NEIGHBOURS
        or len(set(nbs)) != len(nbs)
        or record.node in nbs
        or any(not 0 <= n <= MAX_NODE_ID for n in nbs)
    ):
        return BAD_NEIGHBOURS
    return None


def components(graph: Mapping[int, Iterable[int]]) -> list[frozenset[int]]:
    """The connected parts of ``graph``, largest first (ties: the lowest id first)."""
    seen: set[int] = set()
    parts: list[frozenset[int]] = []
    for start in sorted(graph):
        if start in seen:
            continue
        part = {start}
        todo = [start]
        while todo:
            for nb in graph.get(todo.pop(), ()):
                if nb not in part and nb in graph:
                    part.add(nb)
                    todo.append(nb)
        seen |= part
        parts.append(frozenset(part))
    return sorted(parts, key=lambda p: (-len(p), min(p)))


class Overlay:
    """One node's view of the overlay; see the module docstring."""

    def __init__(
        self,
        node_id: int,
        address: str,
        incarnation: int,
        preferred: Mapping[int, str],
        listener: GraphListener,
        *,
        replace_after: float,
        max_degree: int = 5,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.incarnation = incarnation
        self.preferred = dict(preferred)  # id -> address to dial (from the file)
        self.listener = listener
        self.replace_after = replace_after
        self.max_degree = max_degree
        self.version = 0
        self.leaving = False
        self.records: dict[int, NodeRecord] = {}
        self.heard: dict[int, float] = {}  # when each record was last renewed
        self.up: set[int] = set()
        # Links this node keeps (dials): id -> address. Preferred ones always.
        self.wanted: dict[int, str] = dict(self.preferred)
        # Links others chose to this node, kept while up (not dialed).
        self.accepted: set[int] = set()
        # Wanted neighbours whose link is down: since when (or last news of them).
        self.suspects: dict[int, float] = {}
        # ... and since when their link has been down, news or not (see ``tick``).
        self.down_since: dict[int, float] = {}
        # Preferred neighbours declared unreachable (still dialed): since when.
        self.unreachable: dict[int, float] = {}
        # Links this node dialed (replacements, bridges) that are not up yet: since when.
        # Not suspects: news that the node lives does not make a refused dial succeed.
        self.pending: dict[int, float] = {}
        # Nodes that lose neighbours at the same moment decide at slightly different
        # ones (by id), so each sees the links the others made first.
        self.stagger = (node_id * 2654435761 % 10) * STAGGER_STEP
        # A replacement -> the neighbour it stands in for.
        self.replaces: dict[int, int] = {}
        self.failed: dict[int, float] = {}  # replacements that never came up: when
        # Neighbours lost and not yet replaced, with why (for the change list).
        self._unreplaced: deque[tuple[int, str]] = deque(maxlen=MAX_RECORD_NEIGHBOURS)
        self.changes: deque[tuple[float, str]] = deque(maxlen=RECENT_CHANGES)
        self.change_count = 0  # changes noted since start (the list keeps the last few)
        self.bad_records: dict[str, int] = dict.fromkeys(BAD_RECORD_KEYS, 0)
        self.health = 0
        self._last_tick: float | None = None
        self._on_time_since = 0.0
        self._flooded_at = -RECORD_REFRESH
        self._split_since: float | None = None
        # False until a node named by no file (it came with --join) first has its links.
        self.joined = bool(self.preferred)
        self.graph: dict[int, frozenset[int]] = {}
        self._parts: list[frozenset[int]] = []  # the graph's connected parts (for _bridge)
        self._dirty = True  # records changed since the graph was computed
        self.known: frozenset[int] = frozenset({node_id})

    # -- views ---------------------------------------------------------------

    def linked(self) -> set[int]:
        """The neighbours counted in this node's degree: wanted and not declared
        unreachable (suspects still count: they may come back), and accepted ones."""
        return (set(self.wanted) - set(self.unreachable)) | self.accepted

    @property
    def degree(self) -> int:
        return len(self.linked())

    def own_record(self) -> NodeRecord:
        return NodeRecord(
            self.node_id,
            self.incarnation,
            self.version,
            self.address,
            tuple(sorted(self.up)),
            self.leaving,
        )

    def accepts(self, peer: int) -> bool:
        """Whether an inbound link from ``peer`` (not one this node keeps) is taken."""
        if peer == self.node_id or self.leaving:
            return False
        return peer in self.wanted or peer in self.accepted or self.degree < self.max_degree

    def timeout(self) -> float:
        """How long a suspect waits before it is declared unreachable (Lifeguard)."""
        return self.replace_after * (1 + self.health)

    def status(self, now: float) -> dict[str, object]:
        """What ``gclient --status`` shows: neighbours, suspects, and recent changes."""
        suspects = sorted(self.suspects.items())
        return {
            "neighbours": sorted(self.linked()),
            "suspects": [p for p, _ in suspects],
            "suspect_for": [max(0.0, now - self.down_since.get(p, since)) for p, since in suspects],
            "unreachable": sorted(self.unreachable),
            "members": len(self.graph),
            "health": self.health,
            "changes": [what for _, what in self.changes],
            "change_times": [at for at, _ in self.changes],
            "bad_records": sum(self.bad_records.values()),
        }

    # -- inputs --------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """The node starts: its preferred neighbours are suspect until their links are
        up; its own record is in the table."""
        # Neighbours that start at about the same time get one replace_after more
        # before they count as missing (a cluster's nodes do not all start at once).
        for peer in self.wanted:
            self.suspects.setdefault(peer, now + self.replace_after)
            self.down_since.setdefault(peer, now + self.replace_after)
        self._last_tick = now
        self._on_time_since = now
        return self._flood_own(now) + self._graph_changed(now)

    def link_up(self, peer: int, now: float) -> list[Effect]:
        if peer in self.up:
            return []
        self.up.add(peer)
        effects: list[Effect] = []
        if peer not in self.wanted:
            self.accepted.add(peer)
        self.suspects.pop(peer, None)
        self.down_since.pop(peer, None)
        self.pending.pop(peer, None)
        self.failed.pop(peer, None)
        for entry in [e for e in self._unreplaced if e[0] == peer]:
            self._unreplaced.remove(entry)
        if self.unreachable.pop(peer, None) is not None:
            self._note(now, f"{peer} returned")
            for r, p in sorted(self.replaces.items()):
                if p == peer and self.degree > TARGET_DEGREE:
                    effects += self._drop(r, f"dropped {r} ({peer} returned)", now)
        # Everyone hears of the new link; the new neighbour gets the whole table.
        effects += self._flood_own(now)
        # (Its own record too: restarted, it numbers its new record above its old one.)
        table = [r for n, r in sorted(self.records.items()) if n != self.node_id]
        for i in range(0, len(table), RECORDS_PER_FRAME):
            effects.append(Send(peer, NodeRecordsFrame(tuple(table[i : i + RECORDS_PER_FRAME]))))
        return effects + self._graph_changed(now)

    def link_down(self, peer: int, now: float) -> list[Effect]:
        if peer not in self.up:
            return []
        self.up.discard(peer)
        effects: list[Effect] = []
        if peer in self.accepted:
            # Another node's choice: it redials if it still wants the link.
            self.accepted.discard(peer)
            effects.append(Hangup(peer, "accepted link closed"))
        elif peer in self.wanted and peer not in self.unreachable:
            self.pending.pop(peer, None)
            self.suspects[peer] = now
            self.down_since[peer] = now
        effects += self._flood_own(now)
        leaving = self.records.get(peer)
        if leaving is not None and leaving.leaving:
            effects += self._lost(peer, now, "left")
            effects += self._fill(now)
        return effects + self._graph_changed(now)

    def receive(self, peer: int, frame: NodeRecordsFrame, now: float) -> list[Effect]:
        if len(frame.records) > RECORDS_PER_FRAME:
            reason = f"{len(frame.records)} records in one frame (at most {RECORDS_PER_FRAME})"
            return [DropPeer(peer, reason, OVERSIZED_BATCH)]
        fresh: list[NodeRecord] = []
        effects: list[Effect] = []
        refresh_own = False
        for record in frame.records:
            problem = record_problem(record)
            if problem is not None:
                self.bad_records[problem] += 1
                continue
            if record.node == self.node_id:
                # Ours from an earlier life (or a forgery): number ours above it.
                if record.version >= self.version and record != self.own_record():
                    self.version = min(record.version, MAX_VERSION - 1)
                    refresh_own = True
                continue
            held = self.records.get(record.node)
            if held is not None and held.version >= record.version:
                continue
            if held is None and len(self.records) >= MAX_RECORDS:
                self.bad_records[TABLE_FULL] += 1
                continue
            self.records[record.node] = record
            self._dirty = True
            self.heard[record.node] = now
            fresh.append(record)
        if refresh_own:
            effects += self._flood_own(now)
        if fresh:
            effects += self._send_all(NodeRecordsFrame(tuple(fresh)), exclude=peer)
            for record in fresh:
                effects += self._news(record, now)
        return effects + self._graph_changed(now)

    def tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        self._health(now)
        if now - self._flooded_at >= RECORD_REFRESH:
            effects += self._flood_own(now)
        for node, heard in list(self.heard.items()):
            if now - heard > RECORD_MAX_AGE:
                del self.heard[node]
                del self.records[node]
                self._dirty = True
        for node, when in list(self.failed.items()):
            if now - when > FAILED_DIAL_MEMORY:
                del self.failed[node]
        timeout = self.timeout() + self.stagger
        for peer, since in sorted(self.suspects.items()):
            down = now - self.down_since.get(peer, since)
            if now - since >= timeout:
                effects += self._lost(peer, now, f"unreachable {down:.1f} s")
            elif down >= CUT_OFF_FACTOR * timeout:
                # Others still report it linked, but this node cannot reach it: a cut
                # between the two. Replace it here; it stays dialed if preferred.
                effects += self._lost(peer, now, f"unreachable from here {down:.1f} s")
        for peer, since in sorted(self.pending.items()):
            if now - since >= timeout:
                effects += self._lost(peer, now, f"no link after {now - since:.1f} s")
        if not self.leaving:
            effects += self._fill(now)
            effects += self._bridge(now)
        return effects + self._graph_changed(now)

    def leave(self, now: float) -> list[Effect]:
        """The node is stopping: tell everyone, so its neighbours replace it at once."""
        self.leaving = True
        self._note(now, "leaving")
        return self._flood_own(now)

    # -- internals -----------------------------------------------------------

    def _note(self, now: float, what: str) -> None:
        self.changes.append((now, what))
        self.change_count += 1

    def _health(self, now: float) -> None:
        last, self._last_tick = self._last_tick, now
        if last is None:
            self._on_time_since = now
            return
        if now - last > LATE_TICK:
            if self.health < MAX_HEALTH:
                self.health += 1
                self._note(now, f"late by {now - last:.1f} s: suspicion waits {self.timeout():g} s")
            self._on_time_since = now
        elif self.health and now - self._on_time_since >= HEALTH_RECOVERY:
            self.health -= 1
            self._on_time_since = now

    def _send_all(self, frame: NodeRecordsFrame, exclude: int | None = None) -> list[Effect]:
        return [Send(p, frame) for p in sorted(self.up) if p != exclude]

    def _flood_own(self, now: float) -> list[Effect]:
        self.version += 1
        record = self.own_record()
        self.records[self.node_id] = record
        self._dirty = True
        self._flooded_at = now
        return self._send_all(NodeRecordsFrame((record,)))

    def _news(self, record: NodeRecord, now: float) -> list[Effect]:
        """A newer record: it refutes suspicion of its node (unless it leaves) and of
        the neighbours it names; a leaving neighbour is replaced at once."""
        node = record.node
        if record.leaving:
            if node in self.linked() and node not in self.up:
                return self._lost(node, now, "left") + self._fill(now)
            return []  # replaced once its link goes down (it closes it as it stops)
        for named in (node, *record.neighbours):
            if named in self.suspects:
                self.suspects[named] = now
        return []

    def _lost(self, peer: int, now: float, why: str) -> list[Effect]:
        """Stop counting ``peer``: a preferred one stays dialed (it may come back)."""
        self.suspects.pop(peer, None)
        self.down_since.pop(peer, None)
        self.pending.pop(peer, None)
        effects: list[Effect] = []
        if peer in self.preferred:
            if peer not in self.unreachable:
                self.unreachable[peer] = now
                self._unreplaced.append((peer, why))
                self._note(now, f"{peer} {why}")
        elif peer in self.wanted:
            del self.wanted[peer]
            self.replaces.pop(peer, None)
            self.failed[peer] = now
            self._unreplaced.append((peer, why))
            self._note(now, f"{peer} {why}")
            effects.append(Hangup(peer, why))
        elif peer in self.accepted and peer not in self.up:
            self.accepted.discard(peer)
            effects.append(Hangup(peer, why))
        return effects

    def _drop(self, peer: int, what: str, now: float) -> list[Effect]:
        self.wanted.pop(peer, None)
        self.replaces.pop(peer, None)
        self.suspects.pop(peer, None)
        self.down_since.pop(peer, None)
        self.pending.pop(peer, None)
        self._note(now, what)
        return [Hangup(peer, what)]

    def _candidates(self, exclude: set[int]) -> list[int]:
        """Live nodes this node may link to, best first: degree below the target, then
        the lowest degree, then the lowest id."""
        graph = self.graph
        out = []
        for node, record in self.records.items():
            if (
                node == self.node_id
                or node in exclude
                or node in self.failed
                or record.leaving
                or node not in graph
                or not graph[node]  # a node no one is linked to may be dead
                or len(graph[node]) >= self.max_degree
            ):
                continue
            out.append(node)
        # Ties go by id, counted on from this node's own: deterministic, and nodes that
        # lost neighbours at the same moment do not all pick the same one.
        me, ids = self.node_id, MAX_NODE_ID + 1
        return sorted(
            out, key=lambda n: (len(graph[n]) >= TARGET_DEGREE, len(graph[n]), (n - me) % ids)
        )

    def _link(self, node: int, why: str, now: float) -> list[Effect]:
        address = self.records[node].address
        self.wanted[node] = address
        self.pending[node] = now  # until its link is up
        self._note(now, f"linked {node} ({why})")
        return [Dial(node, address)]

    def _fill(self, now: float) -> list[Effect]:
        """Dial replacements while the degree is below the target."""
        effects: list[Effect] = []
        while self.degree < TARGET_DEGREE:
            taken = self.linked() | set(self.unreachable)
            choices = self._candidates(taken)
            if not choices:
                break
            node = choices[0]
            lost = self._unreplaced.popleft() if self._unreplaced else None
            if lost is not None:
                why = f"replaces {lost[0]}, {lost[1]}"
                if lost[0] in self.preferred:
                    self.replaces[node] = lost[0]
            elif not self.joined:
                why = "joining"
            else:
                why = f"degree {self.degree} below {TARGET_DEGREE}"
            effects += self._link(node, why, now)
        if self.degree >= TARGET_DEGREE:
            self.joined = True
        return effects

    def _bridge(self, now: float) -> list[Effect]:
        """If the live graph has fallen apart for ``timeout()`` seconds, the lowest node
        of each smaller part links to the largest part (every node computes the same
        parts from the same records)."""
        parts = self._parts
        if len(parts) < 2:
            self._split_since = None
            return []
        if self._split_since is None:
            self._split_since = now
            return []
        mine = next(p for p in parts if self.node_id in p)
        if mine is parts[0] or min(mine) != self.node_id:
            return []
        if now - self._split_since < self.timeout() + self.stagger:
            return []
        if any(n in parts[0] for n in self.pending):
            return []  # a bridge is being dialed
        choices = self._candidates(self.linked() | set(self.unreachable) | set(mine))
        choices = [c for c in choices if c in parts[0]]
        if not choices or self.degree >= self.max_degree:
            return []
        self._split_since = now
        return self._link(choices[0], f"bridge to the {len(parts[0])} nodes apart", now)

    def _graph_changed(self, now: float) -> list[Effect]:
        if not self._dirty:
            return []
        self._dirty = False
        graph = self._compute_graph(now)
        self.known = frozenset(self.records) | {self.node_id}
        if graph == self.graph:
            return []
        self.graph = graph
        linked = {n: nbs for n, nbs in graph.items() if nbs or n == self.node_id}
        self._parts = components(linked)
        return self.listener.on_graph(graph)

    def _compute_graph(self, now: float) -> dict[int, frozenset[int]]:
        """Live nodes (fresh records, not leaving) and the links both ends name."""
        live = {n: r for n, r in self.records.items() if not r.leaving}
        live[self.node_id] = self.own_record()
        if self.leaving:
            live.pop(self.node_id)
        return {
            n: frozenset(m for m in r.neighbours if m in live and n in live[m].neighbours)
            for n, r in live.items()
        }
