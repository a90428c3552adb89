"""The rules for a message's path, for whoever receives one and whoever sends one.

A path lists the nodes a message came through before reaching its holder,
origin first, the sender last. Every node stores a message once and never
receives it again, so an honest path names each configured node at most once
and never the node receiving it; that bounds it by the cluster's size minus
one. A node checks this on every message it receives (``path_problem``) and
stores only messages whose path passes: appending itself then yields a path
that every neighbour not on it accepts, so what a node stores it can forward.

A record stored before these rules (an old log), or under another cluster
file (a node removed from the cluster), may hold a path that breaks them;
re-sync and graft replies send such a record with ``relay_path``, which
leaves out what the receiver would refuse, so an old record never costs a
link.
"""

from __future__ import annotations

from collections.abc import Set

# Why a received message was refused (the message only, never the link): the
# keys of the counters in the node's status, in the order shown.
TOO_LONG = "path_too_long"
NOT_FROM_SENDER = "path_not_from_sender"
HAS_RECEIVER = "path_has_receiver"
UNKNOWN_NODE = "path_unknown_node"
REPEATS_NODE = "path_repeats_node"
BODY_TOO_LARGE = "body_too_large"
REFUSALS = (TOO_LONG, NOT_FROM_SENDER, HAS_RECEIVER, UNKNOWN_NODE, REPEATS_NODE, BODY_TOO_LARGE)


def path_problem(
    path: tuple[int, ...], sender: int, receiver: int, members: Set[int]
) -> str | None:
    """Why ``receiver`` must refuse a message with ``path`` from ``sender`` (a key of
    ``REFUSALS``), or None. ``members`` are the configured node ids."""
    if len(path) >= len(members):
        return TOO_LONG  # even an honest path leaves out the receiver
    if not path or path[-1] != sender:
        return NOT_FROM_SENDER
    seen = set(path)
    if receiver in seen:
        return HAS_RECEIVER
    if not seen.issubset(members):
        return UNKNOWN_NODE
    if len(seen) != len(path):
        return REPEATS_NODE
    return None


def relay_path(path: tuple[int, ...], me: int, receiver: int, members: Set[int]) -> tuple[int, ...]:
    """The path to send a held message on to ``receiver`` with: the stored path and
    this node, less any entry ``receiver`` would refuse (itself, an id no longer
    configured, a repeat), so that it passes ``path_problem`` there."""
    out = (*path, me)
    if path_problem(out, me, receiver, members) is None:
        return out  # every record stored under these rules
    seen = {receiver, me}
    kept = []
    for node in path:
        if node in members and node not in seen:
            seen.add(node)
            kept.append(node)
    return (*kept, me)
