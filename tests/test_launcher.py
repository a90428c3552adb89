"""The README's first command: gossip-cluster starts every node, reports, and stops them all.

These run the launcher as a user does, as a separate process. The launcher is
started with SIGINT at its default disposition (``preexec_fn``), so that the
Ctrl-C test means the same whether the suite itself runs in the foreground or
in the background of a non-interactive shell, where SIGINT is ignored and
children inherit that.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gossip.cluster import free_port_base
from gossip.pidfile import is_running, read_pid

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent
# PATH without this environment's bin/: the banner must work as printed anyway.
PLAIN_ENV = {**os.environ, "PATH": "/usr/bin:/bin"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _node_pids(directory: Path) -> list[int]:
    """Running node processes whose command line names this state directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"gossip" in cmd
            and any(str(directory).encode() in c for c in cmd)
            and is_running(int(entry.name))
        ):
            pids.append(int(entry.name))
    return pids


def _launch(directory: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "gossip-cluster"), "--dir", str(directory), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _banner(proc: subprocess.Popen[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    lines = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C stops every node"):
            break
    return "".join(lines)


def _wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(is_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if is_running(p)]


def _ctl(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "gossip-cluster"), *args, "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state directory; every node process left in it is killed afterwards."""
    yield tmp_path
    for p in _node_pids(tmp_path):
        os.kill(p, signal.SIGKILL)


def test_banner_commands_work_as_printed_and_ctrl_c_stops_every_node(state: Path) -> None:
    """``gossip-cluster --nodes 4`` prints the ready banner once every link is up; each
    command in it, run as printed by a shell without the virtualenv on PATH, succeeds
    (the --msgID line prints Apple, the restart-node line restarts a node); SIGINT
    (Ctrl-C) then stops every node, the restarted one included; exit status 0 and no
    traceback."""
    base = free_port_base(8)
    proc = _launch(state, "--nodes", "4", "--base-port", str(base))
    try:
        text = _banner(proc)
        assert "4 nodes of cluster 'local' are up" in text, text
        commands = [line.strip() for line in text.splitlines() if line.startswith("  ")]
        # Addresses, not commands: the files, the dashboard and the metrics pages.
        addresses = ("config:", "logs:", "dashboard:", "metrics:")
        commands = [c for c in commands if not c.startswith(addresses)]
        assert len(commands) == 5 and "--message" in commands[0], commands
        assert "restart-node" in commands[4]
        first_pids = _node_pids(state)
        assert len(first_pids) == 4
        for command in commands:
            deadline = time.monotonic() + 20
            while True:  # gossip may need a moment to reach the node the next line asks
                r = subprocess.run(
                    ["sh", "-c", command],
                    cwd="/",
                    env=PLAIN_ENV,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                if r.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.returncode == 0, (command, r.stderr)
            if "--msgID" in command:
                assert r.stdout == "Apple\n"
        restarted = read_pid(state / "node-3" / "node.pid")
        assert restarted is not None and restarted not in first_pids and is_running(restarted)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        assert err.strip().endswith("gossip-cluster: all nodes stopped"), err
        assert not _wait_gone([*first_pids, restarted])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_node_commands_and_a_node_left_running_do_not_block_the_next_start(state: Path) -> None:
    """stop-node, node-status and start-node act on one node through its pid file; a node
    started by hand while no launcher runs is stopped (saying so) by the next launcher
    start, which comes up; SIGTERM stops that launcher with status 0."""
    base = free_port_base(8)
    proc = _launch(state, "--nodes", "4", "--base-port", str(base))
    try:
        assert "are up" in _banner(proc)
        r = _ctl(state, "stop-node", "2")
        assert r.returncode == 0 and "node 2 (pid" in r.stderr and "stopped" in r.stderr
        r = _ctl(state, "node-status", "2")
        assert (r.returncode, r.stdout) == (3, "node 2: not running\n")
        r = _ctl(state, "start-node", "2")
        assert r.returncode == 0, r.stderr
        r = _ctl(state, "start-node", "2")
        assert r.returncode == 1 and "node 2 is already running" in r.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not _node_pids(state)

        r = _ctl(state, "start-node", "4")  # by hand, no launcher running
        assert r.returncode == 0, r.stderr
        by_hand = read_pid(state / "node-4" / "node.pid")
        assert by_hand is not None and is_running(by_hand)
        proc = _launch(state)
        text = _banner(proc)
        assert "4 nodes of cluster 'local' are up" in text, text
        assert not is_running(by_hand)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert f"stopping node 4 (pid {by_hand}), left running by an earlier start" in err, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_in_use_is_one_line_and_a_failure(state: Path) -> None:
    """With something already listening on one of the cluster's ports, the launcher
    starts nothing, prints one line naming that port and exits with status 1 (before
    the fix it reported another cluster's nodes as its own)."""
    base = free_port_base(8)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", base + 103))  # node 3's client port
    squatter.listen()
    try:
        r = subprocess.run(
            [
                str(BIN / "gossip-cluster"),
                *("--dir", str(state), "--nodes", "4", "--base-port", str(base)),
                "--ready-timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_default_sigint,
        )
    finally:
        squatter.close()
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"gossip-cluster: port 127.0.0.1:{base + 103} (node 3's client port) is in use:"
        " another cluster or program is listening there; stop it, or choose other ports"
        " with --base-port"
    ], r.stderr
    assert r.stdout == ""
    assert not _node_pids(state)


def test_add_node_joins_a_running_cluster(state: Path) -> None:
    """``gossip-cluster add-node`` on a running 4-node cluster writes node 5 into the
    cluster file (between two former neighbours, the old file kept as .prev), restarts
    the running nodes to learn the graph, starts node 5 linked to both; a message
    submitted at node 5 reaches node 1; Ctrl-C then stops all five nodes."""
    base = free_port_base(8)
    proc = _launch(state, "--nodes", "4", "--base-port", str(base))
    try:
        assert "4 nodes of cluster 'local' are up" in _banner(proc)
        r = _ctl(state, "add-node")
        assert r.returncode == 0, r.stderr
        assert "gossip-cluster: node 5 is up, linked to nodes 3 and 4" in r.stderr, r.stderr
        assert (state / "cluster.toml.prev").exists()
        config = state / "cluster.toml"
        assert "allow_any_degree = true" in config.read_text()
        gclient = [str(BIN / "gclient"), "--config", str(config)]
        r = subprocess.run(
            [*gclient, "--id", "5", "--message", "from five"], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = subprocess.run([*gclient, "--id", "1", "--list"], capture_output=True, text=True)
            if "from five" in r.stdout.splitlines():
                break
            time.sleep(0.2)
        assert "from five" in r.stdout.splitlines()
        pids = _node_pids(state)
        assert len(pids) == 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not _wait_gone(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
