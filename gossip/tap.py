"""Starting a node: twistd ``Options`` and ``makeService``, and ``gossip-node``.

``twistd -n gossip --id N`` finds this through ``twisted/plugins/gossip_plugin.py``;
``gossip-node --id N`` runs the same service without twistd's plugin discovery
(its ``dropin.cache`` can be stale or unwritable), which is what systemd units use.

The node is composed as Twisted services (``node_services``): a
``StreamServerEndpointService`` for the peer port and one for the client port,
each listening on its endpoint description in ``privilegedStartService``, the
``GossipNode`` itself, and a ``TimerService`` for the core's ticks. A port
that cannot be listened on stops the start with one line naming the node, the
setting and the endpoint, and a non-zero exit status.

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
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.python import usage
from twisted.python.failure import Failure

from gossip import logs, pidfile, settings
from gossip.config import FSYNC_POLICIES, ConfigError, address_description, load_config
from gossip.gc_thresholds import pace_collector
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
        ["fsync", None, None, settings.FSYNC.help()],
        [
            "join",
            None,
            None,
            'Join a running cluster (overlay = "dynamic") through these peer addresses:'
            " host:port or endpoint descriptions, comma-separated; overrides cluster.join.",
        ],
        ["log-level", "l", "info", f"One of: {', '.join(logs.LEVELS)}."],
        [
            "log-format",
            None,
            "text",
            "text (human-readable) or json (one object per line, with the keys"
            " node, peer and msg_id on every event).",
        ],
        [
            "link-delay",
            None,
            "0",
            "Milliseconds added to every frame this node sends"
            " (for benchmarks of wide-area latency).",
        ],
    ]

    def opt_version(self) -> NoReturn:
        """Print gossip's version and exit."""
        print(f"gossip {version()}")
        raise SystemExit(0)

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
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(
                f"--log-format must be one of {', '.join(logs.FORMATS)}, got {self['log-format']!r}"
            )
        if self["config"] is None:
            self["config"] = str(default_config())
        try:
            self.cluster = load_config(self["config"])
            self.cluster.node(self["id"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["join"] is not None:
            self.cluster = attrs.evolve(self.cluster, join=join_addresses(self["join"]))
        if self.cluster.join and self.cluster.overlay != "dynamic":
            raise usage.UsageError(
                'joining a running cluster needs cluster.overlay = "dynamic" in the cluster file'
            )
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
        _own_pidfile(self)


def join_addresses(text: str) -> tuple[str, ...]:
    """``--join``'s value as client endpoint descriptions: "host:port" (IPv6 as
    "[::1]:port") or a description as the cluster file takes (``tcp:host=...``)."""
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.testing import MemoryReactor

    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            host, sep, port = item.rpartition(":")
            host = host.strip("[]")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise usage.UsageError(f"--join: {item!r} is not host:port")
            item = address_description(host, int(port))
        try:
            clientFromString(MemoryReactor(), item)
        except Exception as e:
            raise usage.UsageError(
                f"--join: {item!r} is not an endpoint description: {e}"
            ) from None
        out.append(item)
    if not out:
        raise usage.UsageError("--join needs at least one host:port")
    return tuple(out)


def _own_pidfile(options: Options) -> None:
    """Under twistd, keep the pid file in the node's data directory (``node.pid``)
    instead of ``twistd.pid`` in the working directory, where two nodes started
    from one directory would block each other; clear it if stale (see gossip.pidfile).
    An explicit ``--pidfile`` other than twistd's default is left alone."""
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("pidfile") != pidfile.TWISTD_DEFAULT:
        return
    path = pidfile.pidfile_path(options["data-dir"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pidfile.clear_stale(path)
    except OSError as e:
        raise usage.UsageError(f"cannot use the data directory {path.parent}: {e}") from None
    parent["pidfile"] = str(path)


def version() -> str:
    """The installed project's version (importlib.metadata), or "unknown" from a bare tree."""
    try:
        return metadata.version("gossip")
    except metadata.PackageNotFoundError:
        return "unknown"


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from gossip.node import StartupError

    pace_collector()
    try:
        fatal = _exit_after_twistd(reactor)
        node = build_node(options, reactor, on_fatal=fatal)
    except StartupError as e:
        raise SystemExit(f"gossip: {e}") from None

    def listen_failed(line: str) -> None:
        node.log.critical("{line}", line=line)
        fatal(line)

    root = _TwistdRoot()
    if options["log-format"] == "json":
        root.log_observer = logs.json_observer(_twistd_log_stream(options))
    return node_services(node, reactor, root, on_fatal=listen_failed)


def _twistd_log_stream(options: Options) -> Any:
    """Where twistd would log: its --logfile ("-" is stdout), else stdout with -n and
    twistd.log without it."""
    parent = getattr(options, "parent", None)
    logfile = parent.get("logfile") if parent is not None else None
    nodaemon = bool(parent.get("nodaemon")) if parent is not None else True
    if logfile == "-" or (not logfile and nodaemon):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(logfile or "twistd.log")


class ListenService(StreamServerEndpointService):
    """Listens on one endpoint; failing to is a ``StartupError`` naming what and where.

    ``StreamServerEndpointService`` logs a failed listen and carries on without the
    port; ``_raiseSynchronously`` makes a failure during ``privilegedStartService``
    raise there instead (endpoints such as TCP's fail at once). A failure that comes
    later (an endpoint that listens asynchronously) goes to ``on_fatal``.
    """

    _raiseSynchronously = True

    def __init__(
        self,
        endpoint: Any,
        factory: Any,
        what: str,
        on_fatal: Callable[[str], None],
    ) -> None:
        super().__init__(endpoint, factory)
        self.what = what
        self.on_fatal = on_fatal
        self._starting = False

    def privilegedStartService(self) -> None:
        from gossip.node import StartupError

        listen = self.endpoint.listen

        def watched_listen(factory: Any) -> Any:
            # Ahead of the base class's errback, which would log a late failure and go on.
            return listen(factory).addErrback(self._late)

        self.endpoint.listen = watched_listen
        self._starting = True
        try:
            super().privilegedStartService()
        except Exception as e:
            self._waitingForPort = None
            raise StartupError(f"cannot listen on {self.what}: {_reason(e)}") from None
        finally:
            self._starting = False
            self.endpoint.listen = listen

    def _late(self, failure: Failure) -> Failure | None:
        from twisted.internet.defer import CancelledError

        if self._starting or failure.check(CancelledError):
            return failure  # raised by privilegedStartService / ignored by the base class
        reason = _reason(failure.value) if failure.value else failure.getErrorMessage()
        self.on_fatal(f"cannot listen on {self.what}: {reason}")
        return None

    def stopService(self) -> Any:
        if self._waitingForPort is None:  # never listened
            self.running = False
            return None
        return super().stopService()


def _reason(e: BaseException) -> str:
    """The operating system's words for a failed listen, without Twisted's prefix."""
    socket_error = getattr(e, "socketError", None)
    if socket_error is not None:
        return str(getattr(socket_error, "strerror", None) or socket_error)
    return str(e).strip() or type(e).__name__


def node_services(
    node: GossipNode,
    reactor: Any,
    parent: service.MultiService | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> service.MultiService:
    """The services of one node, in ``parent`` (a new MultiService by default):
    "node", "tick" (a TimerService), "peer-port" and "client-port" (listening on
    the node's peer_listen and client_listen), and "web" (the HTTP site of
    ``gossip.web.site`` on web_listen, when the node has one; the service's
    ``factory`` is the site, whose ``resource`` takes more children). Stopping runs
    in reverse: the ports stop listening before the node closes its links and its
    store."""
    from twisted.internet.endpoints import serverFromString

    from gossip.client.responder import ClientFactory
    from gossip.node import TICK_SECONDS

    top = parent if parent is not None else _NodeRoot()

    def fatal(line: str) -> None:
        if on_fatal is not None:
            on_fatal(f"node {node.node_id} {line}")
        else:
            node.log.critical("node {node} {line}", node=node.node_id, line=line)

    node.setName("node")
    node.setServiceParent(top)
    ticker = TimerService(TICK_SECONDS, node.tick)
    ticker.clock = reactor
    ticker.setName("tick")
    ticker.setServiceParent(top)
    spec = node.spec
    ports: list[tuple[str, str, str, Any]] = [
        ("peer-port", "peer_listen", spec.peer_listen, node.links.server_factory()),
        ("client-port", "client_listen", spec.client_listen, ClientFactory(node)),
    ]
    if spec.web_listen is not None:
        from gossip.web.site import build_site

        ports.append(("web", "web_listen", spec.web_listen, build_site(node, reactor)))
    for name, key, description, factory in ports:
        endpoint = serverFromString(reactor, description)
        listen = ListenService(endpoint, factory, f"{key} {description}", fatal)
        listen.setName(name)
        listen.setServiceParent(top)
    return top


class _NodeRoot(service.MultiService):
    """The node's services; a failed listen stops the ports already listening, then
    raises ``StartupError`` with the node's id."""

    def privilegedStartService(self) -> None:
        from gossip.node import StartupError

        node = self.getServiceNamed("node")
        try:
            super().privilegedStartService()
        except StartupError as e:
            for child in self:
                if isinstance(child, ListenService):
                    child.stopService()
            raise StartupError(f"node {node.node_id} {e}") from None


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
    from gossip.store import identity
    from gossip.store.log import LogStore, StoreError
    from gossip.store.memory import MemoryStore

    logs.set_level(options["log-level"])
    logs.set_node(options["id"])
    store: MessageStore
    if options["memory"]:
        store = MemoryStore()
    else:
        try:
            identity.claim(
                Path(options["data-dir"]),
                identity.Identity(options.cluster.name, options["id"]),
                options["config"],
            )
        except (identity.IdentityMismatch, OSError) as e:
            raise StartupError(str(e)) from None
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


class _TwistdRoot(_NodeRoot):
    """Turns a start-up failure into one line on stderr and exit status 1 under twistd;
    with ``--log-format json`` gives twistd the JSON observer: twistd adds this service
    to its application, then starts logging to the application's ``ILogObserver``."""

    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        from gossip.node import StartupError

        try:
            super().privilegedStartService()
        except StartupError as e:
            raise SystemExit(f"gossip: {e}") from None


def run_node(argv: list[str] | None = None) -> int:
    """``gossip-node``: one node in the foreground, logs to stderr; SIGTERM/SIGINT stop it.

    Exit status: 0 after a stop by signal, 1 when the node cannot start (a port in
    use, an unusable data directory) or stops on a fatal error, 2 for a usage error.
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from gossip.node import StartupError

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"gossip-node: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --version, --help
        return e.code if isinstance(e.code, int) else 0
    exit_code = [0]
    pace_collector()

    def fatal(line: str) -> None:
        print(f"gossip-node: {line}", file=sys.stderr)
        exit_code[0] = 1
        _stop(reactor)

    try:
        node = build_node(options, reactor, on_fatal=fatal)
    except StartupError as e:
        print(f"gossip-node: {e}", file=sys.stderr)
        return 1
    top = node_services(node, reactor, on_fatal=fatal)
    try:
        top.privilegedStartService()
    except StartupError as e:
        node.store.close()
        print(f"gossip-node: {e}", file=sys.stderr)
        return 1
    globalLogBeginner.beginLoggingTo(
        [logs.observer_for(options["log-format"], sys.stderr)], redirectStandardIO=False
    )
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return exit_code[0]
