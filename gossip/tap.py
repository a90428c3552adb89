"""Starting a node: twistd ``Options`` and ``makeService``, and ``gossip-node``.

``twistd -n gossip --id N`` finds this through ``twisted/plugins/gossip_plugin.py``;
``gossip-node --id N`` runs the same service without twistd's plugin discovery
(its ``dropin.cache`` can be stale or unwritable), which is what systemd units use.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.python import usage

from gossip import logs
from gossip.config import ConfigError, load_config
from gossip.locations import default_config

if TYPE_CHECKING:
    from gossip.node import GossipNode


class Options(usage.Options):
    synopsis = "--id N [--config FILE] [--data-dir DIR] [--log-level LEVEL]"
    longdesc = "Run one node of a gossip cluster."
    optParameters = [
        ["id", "i", None, "This node's id, as in the cluster file (required)."],
        ["config", "c", None, "Cluster file (default: $GOSSIP_CONFIG or the launcher's file)."],
        ["log-level", "l", "info", f"One of: {', '.join(logs.LEVELS)}."],
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


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    top = _TwistdRoot()
    build_node(options, reactor).setServiceParent(top)
    return top


def build_node(options: Options, reactor: Any) -> GossipNode:
    from gossip.node import GossipNode
    from gossip.store.memory import MemoryStore

    logs.set_level(options["log-level"])
    return GossipNode(options.cluster, options["id"], MemoryStore(), reactor)


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
    node = build_node(options, reactor)
    exit_code = [0]

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
