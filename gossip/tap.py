"""Starting a node: twistd ``Options`` and ``makeService``, and ``gossip-node``.

``twistd -n gossip --id N`` finds this through ``twisted/plugins/gossip_plugin.py``;
``gossip-node --id N`` runs the same service without twistd's plugin discovery
(its ``dropin.cache`` can be stale or unwritable), which is what systemd units use.

A node that cannot go on (its store failed) stops the process with exit status
1 under both, so that ``Restart=on-failure`` restarts it: the node reports it
through ``on_fatal``; stopping the reactor is decided here, never inside it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.python import usage

from gossip import logs
from gossip.config import FSYNC_POLICIES, ConfigError, load_config
from gossip.locations import default_config, default_data_dir

if TYPE_CHECKING:
    from gossip.node import GossipNode
    from gossip.store.interface import MessageStore


class Options(usage.Options):
    synopsis = "--id N [--config FILE] [--data-dir DIR | --memory] [--log-level LEVEL]"
    longdesc = "Run one node of a gossip cluster."
    optFlags = [
        ["memory", None, "Keep messages in memory only: nothing survives a restart."],
    ]
    optParameters = [
        ["id", "i", None, "This node's id, as in the cluster file (required)."],
        ["config", "c", None, "Cluster file (default: $GOSSIP_CONFIG or the launcher's file)."],
        [
            "data-dir",
            "d",
            None,
            "Directory of this node's message log (default: node-N in"
            " the state directory, $GOSSIP_HOME or ~/.local/state/gossip).",
        ],
        [
            "fsync",
            None,
            None,
            "fsync policy, overriding the cluster file's: always, batch or never.",
        ],
        ["log-level", "l", "info", f"One of: {', '.join(logs.LEVELS)}."],
        [
            "link-delay",
            None,
            "0",
            "Milliseconds added to every frame this node sends"
            " (for benchmarks of wide-area latency).",
        ],
    ]

    def postOptions(self) -> None:
        if self["id"] is None:
            raise usage.UsageError("--id is required")
        try:
            self["id"] = int(self["id"])
        except ValueError:
            raise usage.UsageError(f"--id must be an integer, got {self['id']!r}") from None
        if self["log-level"] not in logs.LEVELS:
            raise usage.UsageError(
                f"--log-level must be one of {', '.join(logs.LEVELS)}, got {self['log-level']!r}"
            )
        if self["config"] is None:
            self["config"] = str(default_config())
        try:
            self.cluster = load_config(self["config"])
            self.cluster.node(self["id"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["fsync"] is None:
            self["fsync"] = self.cluster.fsync
        elif self["fsync"] not in FSYNC_POLICIES:
            raise usage.UsageError(
                f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, got {self['fsync']!r}"
            )
        try:
            self["link-delay"] = float(self["link-delay"])
            if not 0 <= self["link-delay"] <= 60_000:
                raise ValueError
        except ValueError:
            raise usage.UsageError(
                f"--link-delay must be milliseconds from 0 to 60000, got {self['link-delay']!r}"
            ) from None
        if self["memory"] and self["data-dir"]:
            raise usage.UsageError("--memory and --data-dir exclude each other")
        if self["data-dir"] is None:
            self["data-dir"] = str(default_data_dir(self["id"]))


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from gossip.node import StartupError

    top = _TwistdRoot()
    try:
        build_node(options, reactor, on_fatal=_exit_after_twistd(reactor)).setServiceParent(top)
    except StartupError as e:
        raise SystemExit(f"gossip: {e}") from None
    return top


def _stop(reactor: Any) -> None:
    from twisted.internet.error import ReactorNotRunning

    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


def _exit_after_twistd(reactor: Any) -> Callable[[str], None]:
    """``on_fatal`` under twistd: stop the reactor and leave with status 1.

    twistd has no exit status of its own: once its reactor stops it removes its
    pid file, stops logging and returns 0. So the status is set at interpreter
    exit, after all of that (an exit handler registered now runs first).
    """

    def fatal(reason: str) -> None:
        atexit.register(_exit_now, 1)
        _stop(reactor)

    return fatal


def _exit_now(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def build_node(
    options: Options, reactor: Any, on_fatal: Callable[[str], object] | None = None
) -> GossipNode:
    """The node with its store open (log recovery runs here); StartupError if it can't."""
    from gossip.node import GossipNode, StartupError
    from gossip.store.log import LogStore, StoreError
    from gossip.store.memory import MemoryStore

    logs.set_level(options["log-level"])
    store: MessageStore
    if options["memory"]:
        store = MemoryStore()
    else:
        try:
            store = LogStore.open(
                Path(options["data-dir"]), fsync=options["fsync"], reactor=reactor
            )
        except StoreError as e:
            raise StartupError(str(e)) from None
    return GossipNode(
        options.cluster,
        options["id"],
        store,
        reactor,
        send_delay=options["link-delay"] / 1000.0,
        on_fatal=on_fatal,
    )


class _TwistdRoot(service.MultiService):
    """Turns a start-up failure into one line on stderr and exit status 1 under twistd."""

    def startService(self) -> None:
        from gossip.node import StartupError

        try:
            super().startService()
        except StartupError as e:
            raise SystemExit(f"gossip: {e}") from None


def run_node(argv: list[str] | None = None) -> int:
    """``gossip-node``: one node in the foreground, logs to stderr; SIGTERM/SIGINT stop it."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from gossip.node import StartupError

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"gossip-node: {e}", file=sys.stderr)
        return 2
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    exit_code = [0]

    def fatal(reason: str) -> None:
        exit_code[0] = 1
        _stop(reactor)

    try:
        node = build_node(options, reactor, on_fatal=fatal)
    except StartupError as e:
        print(f"gossip-node: {e}", file=sys.stderr)
        return 1

    def start() -> None:
        try:
            node.startService()
        except StartupError as e:
            print(f"gossip-node: {e}", file=sys.stderr)
            exit_code[0] = 1
            reactor.stop()

    def stop() -> Any:
        if node.running:
            return node.stopService()
        return None

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    return exit_code[0]
