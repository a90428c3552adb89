"""The node's protocol state machine.

``GossipCore`` decides; it does no I/O and reads no clock. Inputs are method
calls (a client's submit, a peer's frame, a link going up or down, a tick),
each with ``now`` passed in; the output is a list of effects (see
``gossip.core.effects``) that the caller carries out before the next input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from itertools import compress
from operator import itemgetter
from typing import Protocol

import attrs

from gossip import settings
from gossip.core.arrivals import Arrivals
from gossip.core.dissemination import Dissemination, group_by_path
from gossip.core.effects import (
    BAD_MESSAGE,
    BAD_SYNC_REQUEST,
    FORGED_ID,
    NOT_UP,
    UNSOLICITED_SYNC,
    DropPeer,
    Effect,
    Persist,
    PersistBatch,
)
from gossip.core.frame_rules import frame_problem
from gossip.core.frames import (
    Envelope,
    GossipFrame,
    NodeRecordsFrame,
    PeerFrame,
    SyncDataFrame,
    SyncHintFrame,
    SyncQueryFrame,
    SyncReplyFrame,
    SyncWantFrame,
)
from gossip.core.message import ID_BYTES, Message, ids_match, message_id
from gossip.core.overlay import Overlay
from gossip.core.paths import BODY_TOO_LARGE, REFUSALS, path_problem
from gossip.core.rate import KeyedBuckets, TokenBucket
from gossip.core.sync import FingerprintTree, SyncEngine

# Refused for coming faster than their origin may send (see ``GossipCore``).
ORIGIN_RATE_LIMITED = "origin_rate_limited"
# A peer's frames may carry this many times a node's own origin quota per origin.
RELAY_HEADROOM = 2
# The keys of ``GossipCore.refused`` (messages dropped, links kept), in the order shown.
REFUSED_KEYS = (*REFUSALS, ORIGIN_RATE_LIMITED)


class HeldIds(Protocol):
    """What the core reads from the store: which ids it holds."""

    def __contains__(self, mid: bytes) -> bool: ...

    def holds_any(self, mids: Iterable[bytes]) -> bool: ...

    def holds_all(self, mids: Iterable[bytes]) -> bool: ...

    def ids(self) -> Iterator[bytes]: ...

    def ids_between(self, lo: bytes, hi: bytes, limit: int) -> list[bytes]: ...

    def get(self, mid: bytes) -> Message | None: ...


class SubmitRejected(ValueError):
    """A client's message cannot be accepted; the text says why."""


class OriginRateLimited(SubmitRejected):
    """The node accepted as many new messages from its clients as ``origin_rate``
    allows for now: nothing was stored, retry later."""


@attrs.frozen(slots=True)
class SubmitBatch:
    """What ``GossipCore.submit_many`` made of several bodies: per body, in order, its
    (id, new) or why it was refused; and the effects of them all."""

    results: list[tuple[bytes, bool] | SubmitRejected]
    effects: list[Effect]


@attrs.frozen(slots=True)
class SubmitResult:
    id: bytes
    new: bool
    effects: list[Effect]


def check_body(body: bytes, max_body: int) -> str | None:
    """Why ``body`` is not an acceptable message, or None."""
    if not body:
        return "message is empty"
    if len(body) > max_body:
        return f"message is {len(body)} bytes, over the limit of {max_body}"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "message is not valid UTF-8"
    return None


class GossipCore:
    """The rules of one node (see the module).

    ``effects_per_frame`` (an attribute, False unless set; the node sets it): when True, the new
    messages of a received Gossip frame yield one ``PersistBatch`` and the
    strategy's ``on_new_batch`` (one ``Send`` per neighbour and group of
    messages), as the node wants under load; when False each yields its own
    ``Persist`` and ``on_new``, which tests and the simulator read more easily.
    The rules applied are the same either way.
    """

    def __init__(
        self,
        node_id: int,
        neighbours: Iterable[int],
        store: HeldIds,
        strategy: Dissemination,
        max_body: int,
        members: Iterable[int],
        *,
        sync_interval: float = settings.SYNC_INTERVAL.default,
        sync_timeout: float = settings.SYNC_TIMEOUT.default,
        origin_rate: float = settings.ORIGIN_RATE.default,
        origin_burst: float = settings.ORIGIN_BURST.default,
    ) -> None:
        """Per-origin limits (token buckets, ``now`` from the caller): the quota
        ``origin_rate`` / ``origin_burst`` applies where a message enters the cluster,
        to the new messages this node accepts from its clients. A message relayed by a
        peer was admitted by its origin under the same quota, so an honest origin's
        new messages reach any node at that rate; bursts may be compressed on the way
        (a link that drained at once), so a peer's frames are allowed
        ``RELAY_HEADROOM`` times the quota per origin, and only the excess of that is
        dropped (counted, the link kept). A dropped message is not lost: re-sync,
        which only pulls what this node asked for and is not limited, fetches it."""
        self.effects_per_frame = False  # see the class docstring
        self.node_id = node_id
        self.neighbours = frozenset(neighbours)
        self.store = store
        self.strategy = strategy
        strategy.bind(store)
        self.max_body = max_body
        # The configured node ids: the only ones a path may name (gossip.core.paths);
        # with the dynamic overlay, also every node it has a record of.
        self.members = self.configured = frozenset(members)
        # The dynamic overlay (None: the file's links are the links, as ever).
        self.overlay: Overlay | None = None
        # Messages refused (dropped, the link kept), by reason: shown in status.
        self.refused: dict[str, int] = dict.fromkeys(REFUSED_KEYS, 0)
        self.origin_quota = TokenBucket(origin_rate, origin_burst)
        self.relay_quota = KeyedBuckets(RELAY_HEADROOM * origin_rate, RELAY_HEADROOM * origin_burst)
        # Submits refused by origin_rate (shown in status beside the client ones).
        self.submits_rate_limited = 0
        # Messages stored and redundant copies dropped, by route (and per recent message).
        self.arrivals = Arrivals()
        self.up: frozenset[int] = frozenset()
        self.tree = FingerprintTree(store.ids())
        self.sync = SyncEngine(
            node_id, self.tree, store, interval=sync_interval, timeout=sync_timeout
        )

    def submit(self, body: bytes, now: float) -> SubmitResult:
        problem = check_body(body, self.max_body)
        if problem:
            raise SubmitRejected(problem)
        mid = message_id(body)
        if mid in self.store:
            self.arrivals.duplicate(mid, "submit")
            return SubmitResult(mid, False, [])
        if not self.origin_quota.take(now):
            raise self._origin_rate_limited()
        # Stored and handed on as a frame of one, as ``submit_many`` does a batch.
        new = GossipFrame.of_columns((mid,), (body,), ((),))
        return SubmitResult(mid, True, self._stored(new, None, now, via="submit"))

    def submit_many(self, bodies: Iterable[bytes], now: float) -> SubmitBatch:
        """``submit`` of each body in order, a refusal given as its result rather than
        raised. The new messages are then stored and handed on together, as a
        received frame's are (one ``PersistBatch`` and ``on_new_batch`` when
        ``effects_per_frame``): a client's batch costs the node per batch, not per
        message, what a relayed frame costs."""
        results: list[tuple[bytes, bool] | SubmitRejected] = []
        ids: list[bytes] = []
        kept: list[bytes] = []
        fresh: set[bytes] = set()
        held, quota, max_body = self.store, self.origin_quota, self.max_body
        for body in bodies:
            problem = check_body(body, max_body)
            if problem:
                results.append(SubmitRejected(problem))
                continue
            mid = message_id(body)
            if mid in fresh or mid in held:
                self.arrivals.duplicate(mid, "submit")
                results.append((mid, False))
            elif quota.take(now):
                fresh.add(mid)
                ids.append(mid)
                kept.append(body)
                results.append((mid, True))
            else:
                results.append(self._origin_rate_limited())
        if not ids:
            return SubmitBatch(results, [])
        new = GossipFrame.of_columns(tuple(ids), tuple(kept), ((),) * len(ids))
        return SubmitBatch(results, self._stored(new, None, now, via="submit"))

    def _origin_rate_limited(self) -> OriginRateLimited:
        """A submit over ``origin_rate`` (counted): the client's one-line reason."""
        self.submits_rate_limited += 1
        return OriginRateLimited(
            f"rate limit: node {self.node_id} takes at most {self.origin_quota.rate:g}"
            " new messages per second from its clients; retry later"
        )

    def peer_up(self, peer: int, now: float) -> list[Effect]:
        if peer in self.up:
            return []
        effects: list[Effect] = []
        if self.overlay is not None:
            # Every link the table took is a neighbour: the overlay chose or accepted it.
            effects = self._overlaid(self.overlay.link_up(peer, now))
        elif peer not in self.neighbours:
            return []
        self.up = self.up | {peer}
        return effects + self.strategy.on_peer_up(peer) + self.sync.link_up(peer, self.up, now)

    def peer_down(self, peer: int, now: float) -> list[Effect]:
        if peer not in self.up:
            return []
        self.up = self.up - {peer}
        effects = self.strategy.on_peer_down(peer) + self.sync.peer_down(peer, self.up, now)
        if self.overlay is not None:
            effects += self._overlaid(self.overlay.link_down(peer, now))
        return effects

    def tick(self, now: float) -> list[Effect]:
        effects = self.strategy.on_tick(now) + self.sync.tick(self.up, now)
        if self.overlay is not None:
            effects += self._overlaid(self.overlay.tick(now))
        return effects

    def use_overlay(self, overlay: Overlay) -> None:
        """Run the dynamic overlay (before ``start``): links come and go as it decides."""
        self.overlay = overlay

    def start(self, now: float) -> list[Effect]:
        """The node starts (before any link is up)."""
        return [] if self.overlay is None else self._overlaid(self.overlay.start(now))

    def leave(self, now: float) -> list[Effect]:
        """The node stops on purpose: with the dynamic overlay, it says so to all."""
        return [] if self.overlay is None else self._overlaid(self.overlay.leave(now))

    def _overlaid(self, effects: list[Effect]) -> list[Effect]:
        """Effects of the overlay, after which the nodes a path may name are updated."""
        assert self.overlay is not None
        self.members = self.configured | self.overlay.known
        return effects

    def receive(self, peer: int, frame: PeerFrame, now: float) -> list[Effect]:
        if peer not in self.up:
            return [DropPeer(peer, "frame from a peer whose link is not up", NOT_UP)]
        problem = frame_problem(frame, len(self.members))
        if problem is not None:
            return [DropPeer(peer, problem[1], problem[0])]
        if isinstance(frame, GossipFrame):
            self.sync.heard(now)  # re-sync spaces its sessions while gossip flows
            return self._receive_gossip(peer, frame, now)
        if isinstance(frame, SyncDataFrame):
            return self._receive_sync_data(peer, frame, now)
        if isinstance(frame, SyncQueryFrame | SyncWantFrame):
            on = self.sync.on_query if isinstance(frame, SyncQueryFrame) else self.sync.on_want
            result = on(peer, frame)  # type: ignore[arg-type]
            if isinstance(result, str):
                return [DropPeer(peer, result, BAD_SYNC_REQUEST)]
            return result
        if isinstance(frame, SyncReplyFrame):
            return self.sync.on_reply(peer, frame, self.up, now)
        if isinstance(frame, SyncHintFrame):
            return self.sync.hinted(peer, frame.ids, self.up, now)
        if isinstance(frame, NodeRecordsFrame):
            # Only a dynamic node sends records; a static one has no use for them.
            if self.overlay is None:
                return []
            return self._overlaid(self.overlay.receive(peer, frame, now))
        return self.strategy.on_control(peer, frame)

    def _receive_gossip(self, peer: int, frame: GossipFrame, now: float) -> list[Effect]:
        """The frame's messages, a path at a time: a frame's messages share few paths
        (and so origins), and an honest sender's are well formed, so the rules read
        its columns. A copy of a held message costs a lookup (the strategy learns who
        sent it); a path is checked once for all its messages; new messages are checked
        together (``_all_sound``) and limited per origin. A frame where any of that
        finds more than copies and refused paths (a malformed or forged message, ids
        repeated within it, an origin over its quota) is read one message at a time by
        ``_receive_rows``, the rule as written, which this pass matches whenever it
        applies."""
        ids, paths = frame.ids, frame.paths
        if not ids or set(map(len, ids)) != {ID_BYTES}:
            return self._receive_rows(peer, frame, now)
        groups = group_by_path(frame)
        problems: dict[tuple[int, ...], str | None] = {}
        for path in groups:
            problems[path] = path_problem(path, peer, self.node_id, self.members)
        # Dedup before validation: nothing of a copy is kept, so its body is neither
        # hashed nor checked. A frame with no copy (nearly every one while gossip
        # flows) costs one set operation; one with copies, a lookup per id.
        any_copy = self.store.holds_any(ids)
        copies = list(map(self.store.__contains__, ids)) if any_copy else [False] * len(ids)
        new: GossipFrame | None = frame  # the usual frame: all new, all paths good
        if any_copy or any(problems.values()):
            taken = [not c and problems[p] is None for c, p in zip(copies, paths, strict=True)]
            rows = list(compress(range(len(ids)), taken))
            new = frame.select(rows) if rows else None
            per_origin = Counter(map(itemgetter(0), new.paths)) if new is not None else {}
        else:
            per_origin = {}
            for path, rows_of in groups.items():
                per_origin[path[0]] = per_origin.get(path[0], 0) + len(rows_of)
        if new is not None and not (self._all_sound(new) and self._within_quota(per_origin, now)):
            return self._receive_rows(peer, frame, now)
        refused = self.refused
        effects: list[Effect] = []
        if any_copy:
            for row in compress(range(len(ids)), copies):
                path = paths[row]
                if problems[path] is None:
                    self.arrivals.duplicate(ids[row], "gossip")
                    env = Envelope(ids[row], frame.bodies[row], path)
                    effects += self.strategy.on_duplicate(env, peer)
        for path, problem in problems.items():
            if problem is not None:
                refused[problem] += len(groups[path])
        if new is not None:
            for origin, n in per_origin.items():
                self.relay_quota.take(origin, now, n)
            effects += self._stored(new, peer, now)
        return effects

    def _all_sound(self, new: GossipFrame) -> bool:
        """Whether every message of ``new`` (new, paths good, ids of ``ID_BYTES``) passes
        ``_check``, and no id repeats: a body of 1 to ``max_body`` bytes of UTF-8
        whose hash is its id."""
        ids, bodies = new.ids, new.bodies
        sizes = list(map(len, bodies))
        if len(set(ids)) != len(ids) or min(sizes) == 0 or max(sizes) > self.max_body:
            return False
        try:
            for _ in map(bytes.decode, bodies):
                pass
        except UnicodeDecodeError:
            return False
        return ids_match(ids, bodies)

    def _within_quota(self, per_origin: Mapping[int, int], now: float) -> bool:
        """Whether each origin's relay quota covers its messages in a frame (else
        ``_receive_rows`` decides which of them are dropped)."""
        quota = self.relay_quota
        return all(n <= quota.available(origin, now) for origin, n in per_origin.items())

    def _stored(
        self, new: GossipFrame, peer: int | None, now: float, via: str = "gossip"
    ) -> list[Effect]:
        """``new``'s messages (new, checked; from ``peer``, None for this node's own
        submits) stored and handed on (see the class)."""
        if self.effects_per_frame:
            return self._stored_batch(new, peer, now, via=via)
        effects: list[Effect] = []
        for env in new.messages:
            effects.append(self._persist(Message(env.id, env.body, now, env.path)))
            self.arrivals.stored_new(env.id, via)
            effects += self.strategy.on_new(env, peer, self.up)
        return effects

    def _receive_rows(self, peer: int, frame: GossipFrame, now: float) -> list[Effect]:
        """The frame's messages one at a time, in order: a copy of a held message costs a
        set lookup (the strategy learns who sent it); a new one is checked (``_check``),
        limited per origin, stored and handed on. The first message only a broken or
        hostile sender makes ends the frame with a ``DropPeer``."""
        effects: list[Effect] = []
        ids, bodies, paths = frame.ids, frame.bodies, frame.paths
        held, fresh, refused = self.store, set(), self.refused
        # A frame's messages share few paths: each distinct one is checked once.
        problems: dict[tuple[int, ...], str | None] = {}
        # Per origin: tokens this frame may take from the relay quota, and took.
        allowed: dict[int, int] = {}
        taken: dict[int, int] = {}
        rows: list[int] = []
        dropped: DropPeer | None = None
        for row, mid in enumerate(ids):
            path = paths[row]
            try:
                problem = problems[path]
            except KeyError:
                problem = problems[path] = path_problem(path, peer, self.node_id, self.members)
            if mid in fresh or mid in held:
                # Dedup before validation: nothing of a copy is kept, so its body is
                # neither hashed nor checked.
                if problem is None:
                    self.arrivals.duplicate(mid, "gossip")
                    effects += self.strategy.on_duplicate(Envelope(mid, bodies[row], path), peer)
                else:
                    refused[problem] += 1
                continue
            verdict = self._check(mid, bodies[row], peer, problem)
            if verdict is not None:
                if isinstance(verdict, DropPeer):
                    dropped = verdict
                    break
                refused[verdict] += 1
                continue
            origin = path[0]
            room = allowed.get(origin)
            if room is None:
                room = allowed[origin] = self.relay_quota.available(origin, now)
            used = taken.get(origin, 0)
            if used >= room:
                refused[ORIGIN_RATE_LIMITED] += 1
                continue
            taken[origin] = used + 1
            fresh.add(mid)
            rows.append(row)
        for origin, used in taken.items():
            self.relay_quota.take(origin, now, used)
        if rows:
            new = frame if len(rows) == len(ids) else frame.select(rows)
            effects += self._stored(new, peer, now)
        if dropped is not None:
            effects.append(dropped)
        return effects

    def _stored_batch(
        self, frame: GossipFrame, sender: int | None, now: float, via: str = "gossip"
    ) -> list[Effect]:
        """``frame``'s messages (new, checked) stored with one ``PersistBatch`` and handed
        on with one ``Send`` per neighbour and group of messages (``on_new_batch``)."""
        self.arrivals.stored_many(frame.ids, via)
        self.tree.add_many(frame.ids)
        effects: list[Effect] = [PersistBatch(frame.ids, frame.bodies, frame.paths, now)]
        return effects + self.strategy.on_new_batch(frame, sender, self.up)

    def _receive_sync_data(self, peer: int, frame: SyncDataFrame, now: float) -> list[Effect]:
        """Store pulled messages; they are not forwarded (see gossip.core.sync). Only
        data for a session this node started with ``peer`` is taken: anything else
        is a peer pushing messages unasked, and costs it the link."""
        if not self.sync.solicited(peer, frame.session):
            reason = f"SyncData for session {frame.session}, which this node did not start with it"
            return [DropPeer(peer, reason, UNSOLICITED_SYNC)]
        effects: list[Effect] = []
        learned: list[bytes] = []
        fresh: set[bytes] = set()
        for sent in frame.messages:
            # Re-sync leaves ids out: the receiver hashes the body anyway.
            env = self._checked(sent, peer, id_optional=True)
            if env is None:
                continue
            if isinstance(env, DropPeer):
                return [*effects, env]
            if env.id in fresh or env.id in self.store:
                self.arrivals.duplicate(env.id, "sync")
                continue
            fresh.add(env.id)
            self.arrivals.stored_new(env.id, "sync")
            effects.append(self._persist(Message(env.id, env.body, now, env.path)))
            learned.append(env.id)
        return effects + self.sync.on_data(peer, frame, learned, self.up, now)

    def _persist(self, message: Message) -> Persist:
        self.tree.add(message.id)
        return Persist(message)

    def _check(
        self, mid: bytes, body: bytes, sender: int, path_refusal: str | None
    ) -> DropPeer | str | None:
        """What must become of a new message (``path_refusal``: its path's problem): None to take
        it, a key of ``refused`` to drop it and count why (a path or size an honest
        node with another cluster file or an old log could send: the link stays),
        or ``DropPeer`` (what only a broken or hostile sender produces)."""
        if len(mid) != ID_BYTES:
            return DropPeer(sender, f"message id of {len(mid)} bytes", BAD_MESSAGE)
        if path_refusal is not None:
            return path_refusal
        if len(body) > self.max_body:
            return BODY_TOO_LARGE
        problem = check_body(body, self.max_body)
        if problem:
            return DropPeer(sender, problem, BAD_MESSAGE)
        if message_id(body) != mid:
            return DropPeer(sender, "message id does not match its body", FORGED_ID)
        return None

    def _checked(
        self, env: Envelope, sender: int, *, id_optional: bool = False
    ) -> Envelope | DropPeer | None:
        """``env`` with its id (hashed from the body when left out); None for a message
        refused and counted (see ``_check``); else the ``DropPeer``."""
        # Re-sync leaves ids out: then the id is the body's hash, checked by itself.
        mid = message_id(env.body) if id_optional and not env.id else env.id
        problem = path_problem(env.path, sender, self.node_id, self.members)
        verdict = self._check(mid, env.body, sender, problem)
        if verdict is None:
            return env if env.id else Envelope(mid, env.body, env.path)
        if isinstance(verdict, DropPeer):
            return verdict
        self.refused[verdict] += 1
        return None
