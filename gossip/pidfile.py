"""A node's pid file, ``node.pid`` in its data directory, and whether it names a live node.

twistd writes the file (``--pidfile``) and refuses to start while it names a
live process. A pid file left behind by a node killed with SIGKILL is only a
problem once its pid is reused or the dead node is a zombie nobody reaped (both
look alive to ``kill(pid, 0)``), so a pid file counts as naming a node only when
that process is running (not a zombie) and its command line mentions gossip.
Everything else is a stale file, which ``clear_stale`` removes before twistd looks.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PIDFILE_NAME = "node.pid"
# twistd's own default (--pidfile): replaced by the node's data directory's pid file.
TWISTD_DEFAULT = "twistd.pid"


def pidfile_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / PIDFILE_NAME


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    # "pid (comm) S ...": the state follows the last ')' (comm may hold one).
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


def is_gossip_node(pid: int) -> bool:
    """Whether ``pid`` is running and looks like a gossip node (its command line)."""
    if not is_running(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust that it is alive
    return b"gossip" in cmdline


def running_node(path: Path) -> int | None:
    """The pid in the pid file at ``path`` if it names a live gossip node, else None."""
    pid = read_pid(path)
    if pid is None or not is_gossip_node(pid):
        return None
    return pid


def clear_stale(path: Path) -> bool:
    """Remove the pid file at ``path`` unless it names a live gossip node; True if removed."""
    if not path.exists() or running_node(path) is not None:
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True
