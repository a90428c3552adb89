"""The README's first command: gossip-cluster starts every node, reports, and stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gossip.cluster import free_port_base

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _node_pids(directory: Path) -> list[int]:
    """Node processes whose command line names this state directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gossip" in cmd and any(str(directory).encode() in c for c in cmd):
            pids.append(int(entry.name))
    return pids


def test_launcher_starts_reports_and_stops_every_node(tmp_path: Path) -> None:
    """``gossip-cluster --nodes 8`` prints the ready banner once every link is up, the
    nodes answer gclient, and SIGINT (Ctrl-C) stops every node process; exit status 0."""
    base = free_port_base(16)
    proc = subprocess.Popen(
        [
            str(BIN / "gossip-cluster"),
            "--nodes",
            "8",
            "--dir",
            str(tmp_path),
            "--base-port",
            str(base),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        banner = []
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if line.startswith("Ctrl-C stops every node"):
                break
        text = "".join(banner)
        assert "8 nodes of cluster 'local' are up" in text, text
        assert "gclient --id 1 --message" in text
        nodes = _node_pids(tmp_path)
        assert len(nodes) == 8
        r = subprocess.run(
            [
                str(BIN / "gclient"),
                "--config",
                str(tmp_path / "cluster.toml"),
                "--id",
                "3",
                "--message",
                "launched",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in nodes if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _node_pids(tmp_path):
            os.kill(p, signal.SIGKILL)
