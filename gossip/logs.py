"""One level filter for every gossip logger, so ``--log-level`` works under twistd too.

twistd installs its own observer after the plugin's ``makeService`` runs, so
instead of filtering there, every gossip ``Logger`` emits through
``observer`` below, which drops events under the chosen level before they
reach the global publisher.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

LEVELS = ("debug", "info", "warn", "error", "critical")

level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [level_filter])


def set_level(name: str) -> None:
    level_filter.defaultLogLevel = LogLevel.levelWithName(name)


def logger() -> Logger:
    """A class-attribute logger that honours the gossip level filter."""
    return Logger(observer=observer)
