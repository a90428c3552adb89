"""The lab's network: one namespace per node, a bridge in a namespace of its own, no way out.

Layout for a lab of n nodes, ``T`` being the run's tag (``<owner pid>x<random>``)::

    glab-T-br   br0 (no address), and one veth end per member
    glab-T-nI   eth0 = 10.77.0.I/24, lo; no default route; nft table ``inet lab``
    glab-T-c    eth0 = 10.77.0.200/24: the client driver's namespace

Nothing in the lab is routed: the only route in a member namespace is the
subnet's own, and the root namespace has no interface in the lab, so no test
packet can leave it (and the root namespace never sends to a lab address:
every client runs in the client namespace).

Faults are nft rules inside a node's namespace: a set ``blocked`` of peer
addresses whose packets are dropped both ways. The client namespace is never
blocked, so clients reach both sides of a partition. Dropping (not rejecting)
is what a real partition does: connections hang until idle timeouts fire.

Everything here is synchronous (``ip`` and ``nft`` return in milliseconds).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence

PREFIX = "glab"
SUBNET = "10.77.0"
PREFIX_LEN = 24
CLIENT_HOST = 200
# Node addresses are SUBNET.1 .. SUBNET.MAX_NODES (below the client's).
MAX_NODES = CLIENT_HOST - 1
# Bound on one ip/nft call: they return in milliseconds unless something is badly wrong.
COMMAND_TIMEOUT = 20.0

_NFT_TABLE = """\
table inet lab {
    set blocked { type ipv4_addr; }
    chain input { type filter hook input priority 0; policy accept; ip saddr @blocked drop; }
    chain output { type filter hook output priority 0; policy accept; ip daddr @blocked drop; }
}
"""


class LabError(Exception):
    """A namespace command failed; the message is the command and its stderr."""


def run(args: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    """Run one command; its stdout. LabError (one line) if it fails and ``check``."""
    try:
        done = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(args)}: {e}") from None
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package})"
    probe = f"{PREFIX}-probe{os.getpid()}"
    try:
        run(["ip", "netns", "add", probe])
        run(["ip", "netns", "exec", probe, "nft", "-f", "-"], stdin=_NFT_TABLE)
    except LabError as e:
        return f"cannot make a network namespace with an nft table: {e}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


def lab_namespaces() -> list[str]:
    """Names of every lab namespace on this machine (any run)."""
    out = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX + "-")]


def _owner_alive(name: str) -> bool:
    tag = name.split("-")[1]  # glab-<pid>x<rand>-<member>
    try:
        pid = int(tag.split("x")[0])
    except ValueError:
        return False  # not one of ours in shape; a probe whose owner is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers() -> list[str]:
    """Remove the namespaces of lab runs whose owner process is gone (a run that was
    killed before it could tear down), ending the lab processes left inside them.
    Labs of live runs are left alone. Returns the names removed."""
    removed = []
    for name in lab_namespaces():
        if name.startswith(f"{PREFIX}-probe") or _owner_alive(name):
            continue
        for pid in run(["ip", "netns", "pids", name], check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


class Netns:
    """The namespaces, links and packet filters of one lab of ``size`` nodes (ids 1..size)."""

    def __init__(self, size: int, tag: str | None = None) -> None:
        if not 1 <= size <= MAX_NODES:
            raise ValueError(f"a lab holds 1 to {MAX_NODES} nodes, not {size}")
        self.size = size
        self.tag = tag or f"{os.getpid()}x{random.randrange(16**4):04x}"
        self.bridge_ns = f"{PREFIX}-{self.tag}-br"
        self.client_ns = f"{PREFIX}-{self.tag}-c"
        self.created: list[str] = []

    @property
    def nodes(self) -> list[int]:
        return list(range(1, self.size + 1))

    def node_ns(self, node: int) -> str:
        return f"{PREFIX}-{self.tag}-n{node}"

    @staticmethod
    def address(node: int) -> str:
        return f"{SUBNET}.{node}"

    @property
    def client_address(self) -> str:
        return f"{SUBNET}.{CLIENT_HOST}"

    def exec_prefix(self, ns: str) -> list[str]:
        """Prefix that runs a command inside ``ns`` (``ip netns exec`` execs it: same PID)."""
        return [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", ns]

    # -- building and tearing down ------------------------------------------

    def create(self) -> None:
        """Build the lab; on any failure, remove what was made and raise LabError."""
        try:
            self._add_ns(self.bridge_ns)
            ip_br = ["ip", "-n", self.bridge_ns]
            run([*ip_br, "link", "add", "br0", "type", "bridge"])
            run([*ip_br, "link", "set", "br0", "up"])
            members = [(self.node_ns(n), f"n{n}", self.address(n)) for n in self.nodes]
            members.append((self.client_ns, "c", self.client_address))
            for ns, port, addr in members:
                self._add_ns(ns)
                veth = ["eth0", "netns", ns, "type", "veth", "peer", "name", port]
                run(["ip", "link", "add", *veth, "netns", self.bridge_ns])
                run([*ip_br, "link", "set", port, "master", "br0", "up"])
                ip_ns = ["ip", "-n", ns]
                run([*ip_ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", "eth0"])
                run([*ip_ns, "link", "set", "lo", "up"])
                run([*ip_ns, "link", "set", "eth0", "up"])
            for n in self.nodes:
                run([*self.exec_prefix(self.node_ns(n)), "nft", "-f", "-"], stdin=_NFT_TABLE)
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self.created.append(ns)

    def destroy(self) -> None:
        """Delete every namespace this lab made (their veths and rules go with them)."""
        for ns in reversed(self.created):
            run(["ip", "netns", "del", ns], check=False)
        self.created.clear()

    def routes(self, ns: str) -> list[str]:
        return run(["ip", "-n", ns, "-4", "route", "show"]).splitlines()

    def addresses(self, ns: str) -> list[str]:
        out = run(["ip", "-n", ns, "-4", "-o", "addr", "show"])
        return [line.split()[3] for line in out.splitlines() if line.strip()]

    # -- faults ----------------------------------------------------------------

    def nft(self, node: int, *args: str) -> str:
        return run([*self.exec_prefix(self.node_ns(node)), "nft", *args])

    def block(self, node: int, peers: Iterable[int]) -> None:
        """Drop every packet between ``node`` and each of ``peers`` (rule in node's namespace)."""
        addrs = [self.address(p) for p in peers if p != node]
        if addrs:
            elements = "{ " + ", ".join(addrs) + " }"
            self.nft(node, "add", "element", "inet", "lab", "blocked", elements)

    def cut(self, node: int) -> None:
        """Cut ``node`` off from every other node (clients still reach it)."""
        self.block(node, self.nodes)

    def split(self, side_a: Sequence[int], side_b: Sequence[int]) -> None:
        """No packet between the two sides."""
        for n in side_a:
            self.block(n, side_b)
        for n in side_b:
            self.block(n, side_a)

    def drop_link(self, a: int, b: int) -> None:
        self.block(a, [b])
        self.block(b, [a])

    def blocked(self, node: int) -> list[str]:
        out = self.nft(node, "list", "set", "inet", "lab", "blocked")
        text = out.split("blocked", 1)[-1]
        return [w.strip(",{} ") for w in text.split() if w.count(".") == 3]

    def heal(self, nodes: Iterable[int] | None = None) -> None:
        """Remove every drop rule (of ``nodes``, default all)."""
        for n in self.nodes if nodes is None else nodes:
            self.nft(n, "flush", "set", "inet", "lab", "blocked")
