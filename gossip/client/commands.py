"""AMP commands between clients and a node, shared by both sides.

AMP limits every value to 65,535 bytes, so a listing is paged: the node fills
each ``ListMessages`` page up to ``PAGE_BYTES`` and the client asks again from
the cursor it got back until ``next`` reaches ``total``.

Any command with missing or malformed arguments is answered with ``BadRequest``
(the connection stays open); a command the connection may not use before
``Login`` with ``NotAuthenticated``. ``Submit`` and ``SubmitMany`` are answered
with ``NodeBusy`` when the node takes no new submits for now and with
``RateLimited`` over a submit rate: retry later.
"""

from __future__ import annotations

from twisted.protocols import amp

# Leaves room under AMP's 65,535-byte value limit for the per-entry keys.
PAGE_BYTES = 60_000
# Body bytes per SubmitMany (each body also costs a 2-byte length in the value).
BATCH_BYTES = 60_000
# Raw 16-byte ids per ListIds page (under the value limit).
IDS_PER_PAGE = 4000
# Entries per Arrivals page: 22-character ids, a path of up to a few dozen hops.
ARRIVALS_PER_PAGE = 200
# The largest message body a node may be configured to accept (one per page).
MAX_BODY_LIMIT = PAGE_BYTES - 200


class MessageRejected(Exception):
    """The node will not take this message (size, encoding)."""


class NodeBusy(Exception):
    """The node takes no new submits for now (a neighbour's link is full and enough
    submits already wait for it to drain). Nothing was stored: retry later."""


class BadRequest(Exception):
    """The request's arguments are missing or malformed (a client bug, not a node fault)."""


class NotAuthenticated(Exception):
    """The node needs the client token for this command (submitting, and reading unless
    ``client_read_without_token``) and the connection has not logged in with it, or the
    token given is wrong (the node then closes the connection)."""


class RateLimited(Exception):
    """Over a submit rate (this connection's ``client_submit_rate`` or the node's
    ``origin_rate``): nothing was stored, retry later."""


class NotFound(Exception):
    pass


class AmbiguousId(Exception):
    pass


class BadId(Exception):
    pass


# Every command can be answered with BadRequest; submits also with NodeBusy.
COMMON_ERRORS: dict[type[Exception], bytes] = {
    BadRequest: b"BAD_REQUEST",
    NotAuthenticated: b"NOT_AUTHENTICATED",
}
SUBMIT_ERRORS = {
    **COMMON_ERRORS,
    MessageRejected: b"REJECTED",
    NodeBusy: b"BUSY",
    RateLimited: b"RATE_LIMIT",
}


class Login(amp.Command):
    """Present the client token (the bytes of the node's ``client_token_file``, without
    surrounding whitespace). Needed first on a node that has a token, for submitting
    and, unless ``client_read_without_token``, for everything else; accepted (and not
    needed) on a node without one. A wrong token is answered with
    ``NotAuthenticated`` and the connection is closed."""

    arguments = [(b"token", amp.String())]
    response = []
    errors = COMMON_ERRORS


class Submit(amp.Command):
    arguments = [(b"body", amp.Unicode())]
    response = [(b"id", amp.Unicode()), (b"new", amp.Boolean())]
    errors = SUBMIT_ERRORS


class SubmitMany(amp.Command):
    """Several submits in one round trip: ``GossipClient`` sends the submits made
    in one reactor turn together. Answers per body, in order, with its id or, for
    a body the node refuses, an empty id and the reason in ``errors``. All bodies
    together stay under ``BATCH_BYTES`` (AMP's 64 KiB value limit)."""

    arguments = [(b"bodies", amp.ListOf(amp.Unicode()))]
    response = [(b"ids", amp.ListOf(amp.Unicode())), (b"errors", amp.ListOf(amp.Unicode()))]
    errors = SUBMIT_ERRORS


class Get(amp.Command):
    """Look a message up by its id or a unique prefix of it. ``via`` says how it came
    (submit, gossip, sync) and ``duplicates`` how many redundant copies arrived since;
    both are known for the node's recent messages only ("" and -1 otherwise, and
    missing from older nodes)."""

    arguments = [(b"id", amp.Unicode())]
    response = [
        (b"id", amp.Unicode()),
        (b"body", amp.Unicode()),
        (b"received_at", amp.Float()),
        (b"path", amp.ListOf(amp.Integer())),
        (b"via", amp.Unicode(optional=True)),
        (b"duplicates", amp.Integer(optional=True)),
    ]
    errors = {
        **COMMON_ERRORS,
        NotFound: b"NOT_FOUND",
        AmbiguousId: b"AMBIGUOUS",
        BadId: b"BAD_ID",
    }


class ListIds(amp.Command):
    """The ids held durably, in arrival order from position ``start``: a cheap way to
    follow what a node receives (16 raw bytes per id, concatenated; at most
    ``IDS_PER_PAGE``). ``total`` is the count held durably."""

    arguments = [(b"start", amp.Integer()), (b"limit", amp.Integer())]
    response = [(b"ids", amp.String()), (b"next", amp.Integer()), (b"total", amp.Integer())]
    errors = COMMON_ERRORS


class Watch(amp.Command):
    """Follow a node: it pushes ``Delivered`` for the ids it holds durably from position
    ``start`` on, those held now and then each as it becomes durable, while the
    connection lasts (pushes pause while the client does not read). Answers with the
    count held durably now. ``ListIds`` polls the same sequence."""

    arguments = [(b"start", amp.Integer())]
    response = [(b"durable", amp.Integer())]
    errors = {**COMMON_ERRORS, NodeBusy: b"BUSY"}  # busy: as many watchers as allowed


class Delivered(amp.Command):
    """Node -> watching client: the durable ids at positions [start, start + len(ids) / 16)."""

    arguments = [(b"start", amp.Integer()), (b"ids", amp.String())]
    requiresAnswer = False


class Arrivals(amp.Command):
    """The messages this node stored at or after ``since`` (its clock), newest first,
    from position ``before`` down (-1: from the newest): per message its id, arrival
    time, path, how it came and its redundant copies (-1: not known). At most
    ``ARRIVALS_PER_PAGE``; ``next`` is the ``before`` of the next page, -1 when done."""

    arguments = [(b"since", amp.Float()), (b"before", amp.Integer())]
    response = [
        (
            b"arrivals",
            amp.AmpList(
                [
                    (b"id", amp.Unicode()),
                    (b"received_at", amp.Float()),
                    (b"path", amp.ListOf(amp.Integer())),
                    (b"via", amp.Unicode()),
                    (b"duplicates", amp.Integer()),
                    (b"size", amp.Integer()),
                ]
            ),
        ),
        (b"next", amp.Integer()),
    ]
    errors = COMMON_ERRORS


class ListMessages(amp.Command):
    arguments = [(b"start", amp.Integer()), (b"limit", amp.Integer())]
    response = [
        (b"messages", amp.AmpList([(b"id", amp.Unicode()), (b"body", amp.Unicode())])),
        (b"next", amp.Integer()),
        (b"total", amp.Integer()),
    ]
    errors = COMMON_ERRORS


class Status(amp.Command):
    response = [
        (b"node_id", amp.Integer()),
        (b"cluster", amp.Unicode()),
        (b"dissemination", amp.Unicode()),
        (b"message_count", amp.Integer()),
        (b"uptime", amp.Float()),
        # The node's process id: the launcher checks that the node answering on a
        # port is the process it started (optional: older nodes do not send it).
        (b"pid", amp.Integer(optional=True)),
        (
            b"traffic",
            amp.AmpList(
                [
                    (b"kind", amp.Unicode()),
                    (b"frames_out", amp.Integer()),
                    (b"bytes_out", amp.Integer()),
                    (b"messages_out", amp.Integer()),
                    (b"frames_in", amp.Integer()),
                    (b"bytes_in", amp.Integer()),
                    (b"messages_in", amp.Integer()),
                ]
            ),
        ),
        (
            b"sync",
            amp.AmpList(
                [
                    (b"sessions_started", amp.Integer()),
                    (b"sessions_completed", amp.Integer()),
                    (b"sessions_aborted", amp.Integer()),
                    (b"messages_pulled", amp.Integer()),
                ]
            ),
        ),
        (b"refused", amp.AmpList([(b"reason", amp.Unicode()), (b"count", amp.Integer())])),
        # Peer connections closed for what the peer did, by reason (optional: older nodes).
        (
            b"disconnects",
            amp.AmpList([(b"reason", amp.Unicode()), (b"count", amp.Integer())], optional=True),
        ),
        (
            b"store",
            amp.AmpList(
                [
                    (b"policy", amp.Unicode()),
                    (b"durable", amp.Integer()),
                    (b"fsyncs", amp.Integer()),
                    (b"last_fsync_seconds", amp.Float()),
                ]
            ),
        ),
        (
            b"links",
            amp.AmpList(
                [
                    (b"peer", amp.Integer()),
                    (b"address", amp.Unicode()),
                    (b"state", amp.Unicode()),
                    (b"since", amp.Float()),
                    (b"times_up", amp.Integer()),
                    (b"last_error", amp.Unicode()),
                    (b"times_down", amp.Integer(optional=True)),
                    (b"recent_downs", amp.ListOf(amp.Float(), optional=True)),
                ]
            ),
        ),
        # The dynamic overlay (absent with the static one, and from older nodes).
        (
            b"overlay",
            amp.AmpList(
                [
                    (b"neighbours", amp.ListOf(amp.Integer())),
                    (b"suspects", amp.ListOf(amp.Integer())),
                    (b"suspect_for", amp.ListOf(amp.Float())),
                    (b"unreachable", amp.ListOf(amp.Integer())),
                    (b"members", amp.Integer()),
                    (b"health", amp.Integer()),
                    (b"changes", amp.ListOf(amp.Unicode())),
                    (b"change_times", amp.ListOf(amp.Float())),
                    (b"bad_records", amp.Integer()),
                ],
                optional=True,
            ),
        ),
    ]
    errors = COMMON_ERRORS
