"""``twistd -n gossip`` as the README shows it: nodes started from one directory, and a
node started again after SIGKILL, are not blocked by a pid file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterlib import write_cluster

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent


def _status(config: Path, node: int, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(
            [str(BIN / "gclient"), "--config", str(config), "--id", str(node), "--status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode == 0 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_nodes_started_from_one_directory_do_not_block_each_other(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Two nodes started with ``twistd -n gossip`` from the same working directory both
    run: twistd's default ``twistd.pid`` is replaced by ``node.pid`` in each node's data
    directory. A node killed with SIGKILL (its pid file left behind, the process an
    unreaped zombie) starts again from there; a clean stop removes the pid file."""
    config, _ = write_cluster(tmp_path, 4)
    cwd = tmp_path / "here"
    cwd.mkdir()

    def start(node: int) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [
                str(BIN / "twistd"),
                "-n",
                "gossip",
                *("--id", str(node), "--config", str(config)),
                *("--data-dir", str(tmp_path / f"node-{node}")),
            ],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(p)
        return p

    one, two = start(1), start(2)
    for node, p in ((1, one), (2, two)):
        r = _status(config, node)
        assert r.returncode == 0 and r.stdout.startswith(f"node {node} of cluster"), r.stderr
        assert (tmp_path / f"node-{node}" / "node.pid").read_text().strip() == str(p.pid)
    assert not (cwd / "twistd.pid").exists()

    one.send_signal(signal.SIGKILL)
    while True:  # dead, not reaped: kill(pid, 0) still succeeds on the zombie
        with open(f"/proc/{one.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    os.kill(one.pid, 0)
    assert (tmp_path / "node-1" / "node.pid").exists()
    again = start(1)
    r = _status(config, 1)
    assert r.returncode == 0, r.stderr
    assert again.poll() is None
    assert (tmp_path / "node-1" / "node.pid").read_text().strip() == str(again.pid)

    two.send_signal(signal.SIGTERM)
    two.wait(timeout=30)
    assert not (tmp_path / "node-2" / "node.pid").exists()
