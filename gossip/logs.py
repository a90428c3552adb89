"""Log levels and formats: one level filter for every gossip logger (so ``--log-level``
works under twistd too) and the JSON observer of ``--log-format json``.

twistd installs its own observer after the plugin's ``makeService`` runs, so
instead of filtering there, every gossip ``Logger`` emits through
``observer`` below, which drops events under the chosen level before they
reach the global publisher.
"""

from __future__ import annotations

from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

LEVELS = ("debug", "info", "warn", "error", "critical")

level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [level_filter])


def set_level(name: str) -> None:
    level_filter.defaultLogLevel = LogLevel.levelWithName(name)


def logger() -> Logger:
    """A class-attribute logger that honours the gossip level filter."""
    return Logger(observer=observer)


FORMATS = ("text", "json")
# Keys every JSON log event carries (null when the event is about no such thing), so
# that a log pipeline can index them: the node, the neighbour (peer node id) and the
# message id. ``set_node`` fills in "node" for events that do not name one
# (Twisted's own, the store's).
STABLE_KEYS = ("node", "peer", "msg_id")
_process_node: list[int | None] = [None]


def set_node(node_id: int) -> None:
    """The node this process runs: the default "node" of every JSON event."""
    _process_node[0] = node_id


def json_observer(stream: IO[str]) -> ILogObserver:
    """One JSON object per line (``jsonFileLogObserver``, record separator left out),
    each with the ``STABLE_KEYS`` and the rendered text under "text"."""
    inner = jsonFileLogObserver(stream, recordSeparator="")

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        out = dict(event)
        for key in STABLE_KEYS:
            out.setdefault(key, _process_node[0] if key == "node" else None)
        out.setdefault("text", formatEvent(event))
        inner(out)

    observer: ILogObserver = observe
    return observer


def observer_for(fmt: str, stream: IO[str]) -> ILogObserver:
    """The observer of a ``--log-format``: human-readable text (default) or JSON lines."""
    if fmt == "json":
        return json_observer(stream)
    text: ILogObserver = textFileLogObserver(stream)
    return text
