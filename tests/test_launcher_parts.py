"""The launcher's parts without a running cluster: whose node answers, stopping,
the cluster file it keeps, the banner, and stale pid files."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from gossip.cluster import ClusterFailed, LocalCluster, NodeProcess, _cluster_file, ready_banner
from gossip.config import dump_config, load_config
from gossip.core.message import message_id, short_id
from gossip.pidfile import clear_stale, is_gossip_node, is_running, running_node
from gossip.topology import generate_config


def _cluster(tmp_path: Path, reactor: Any, n: int = 4) -> LocalCluster:
    path = tmp_path / "cluster.toml"
    path.write_text(dump_config(generate_config(n, base_peer_port=29400)))
    return LocalCluster(reactor, path, tmp_path)


def test_a_node_answered_by_another_process_is_not_ready(tmp_path: Path) -> None:
    """wait_ready does not take a node whose client port is answered by another process
    (another cluster on the same ports, all links up) for the process it started: it
    keeps waiting and fails naming the foreign pid (before, it reported ready)."""
    clock = task.Clock()
    cluster = _cluster(tmp_path, clock)
    for n in cluster.config.nodes:
        proc = NodeProcess(n)
        proc.pid = 40000 + n
        cluster.processes[n] = proc

    async def foreign_status(node_id: int) -> dict[str, Any]:
        return {"pid": 555, "links": [{"peer": 1, "state": "up"}]}

    cluster.node_status = foreign_status  # type: ignore[method-assign]
    d = defer.Deferred.fromCoroutine(cluster.wait_ready(timeout=1.0))
    for _ in range(10):
        clock.advance(0.2)
    with pytest.raises(ClusterFailed) as failure:
        d.result.raiseException()
    d.addErrback(lambda _: None)
    assert "answered by another process (pid 555), not ours (pid 40001)" in str(failure.value)


def test_ready_when_the_answering_process_is_ours(tmp_path: Path) -> None:
    """The same check passes once the pid in every node's status is the started one."""
    clock = task.Clock()
    cluster = _cluster(tmp_path, clock)
    for n in cluster.config.nodes:
        proc = NodeProcess(n)
        proc.pid = 40000 + n
        cluster.processes[n] = proc

    async def own_status(node_id: int) -> dict[str, Any]:
        return {"pid": 40000 + node_id, "links": [{"peer": 1, "state": "up"}]}

    cluster.node_status = own_status  # type: ignore[method-assign]
    d = defer.Deferred.fromCoroutine(cluster.wait_ready(timeout=1.0))
    assert d.called and d.result is None


@pytest_twisted.ensureDeferred
async def test_stopping_a_node_that_needs_sigkill_logs_no_error(tmp_path: Path) -> None:
    """A node process that ignores SIGTERM is killed after the timeout, and stopping it
    logs no failure (before, the timed-out wait cancelled the shared ``ended`` Deferred
    and the process's end raised two AssertionError tracebacks)."""
    from twisted.internet import reactor

    cluster = _cluster(tmp_path, reactor)
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        stubborn = NodeProcess(1)
        script = (
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)"
        )
        reactor.spawnProcess(stubborn, sys.executable, [sys.executable, "-c", script], env=None)
        cluster.processes[1] = stubborn
        await task.deferLater(reactor, 0.5)  # let it install its handler
        watcher = stubborn.ended
        await cluster.stop_all(timeout=0.5)
        assert stubborn.exit_code == -9
        assert await watcher == -9
        await task.deferLater(reactor, 0.1)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert errors == []


def _args(**given: Any) -> argparse.Namespace:
    return argparse.Namespace(
        **{"config": None, "nodes": None, "base_port": None, "fresh": False, **given}
    )


def test_an_edited_cluster_file_is_used_as_it_is(tmp_path: Path) -> None:
    """A cluster.toml the user edited (switched to flood) is kept on the next start
    (before, every start rewrote it with the defaults)."""
    path, _ = _cluster_file(_args(nodes=4), tmp_path)
    edited = path.read_text().replace('dissemination = "plumtree"', 'dissemination = "flood"')
    path.write_text(edited)
    path2, config = _cluster_file(_args(), tmp_path)
    assert path2 == path and path.read_text() == edited
    assert config.dissemination == "flood" and len(config.nodes) == 4


def test_nodes_asks_for_a_new_file_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--nodes writes a new cluster file even over an edited one, says so on stderr and
    keeps the old file as cluster.toml.prev."""
    path, _ = _cluster_file(_args(nodes=4), tmp_path)
    edited = path.read_text().replace("plumtree", "flood")
    path.write_text(edited)
    capsys.readouterr()
    _, config = _cluster_file(_args(nodes=6), tmp_path)
    assert len(config.nodes) == 6 and config.dissemination == "plumtree"
    assert (tmp_path / "cluster.toml.prev").read_text() == edited
    err = capsys.readouterr().err
    assert err.startswith(f"gossip-cluster: wrote a new {path} (6 nodes)"), err
    assert len(err.splitlines()) == 1


def test_banner_shows_the_id_the_first_command_prints(tmp_path: Path) -> None:
    """The banner's --msgID line carries the short id of "Apple" (ids are hashes of the
    body), not a placeholder a shell would read as a redirection."""
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(dump_config(generate_config(16)))
    text = ready_banner(load_config(config_path), config_path, tmp_path)
    assert f"--msgID {short_id(message_id(b'Apple'))}\n" in text
    assert "<" not in text and ">" not in text


def test_banner_prints_the_dashboard_address(tmp_path: Path) -> None:
    """With web_listen (as the launcher writes it), the banner gives node 1's dashboard."""
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(dump_config(generate_config(16, web=True)))
    text = ready_banner(load_config(config_path), config_path, tmp_path)
    assert "  dashboard: http://127.0.0.1:17201/dashboard/ " in text


def test_stale_pid_files_are_cleared_and_live_nodes_kept(tmp_path: Path) -> None:
    """A pid file naming a dead process, a zombie, or a live process that is not a gossip
    node is stale and cleared; one naming a live gossip node is kept."""
    path = tmp_path / "node.pid"
    zombie = subprocess.Popen(["true"])
    for _ in range(100):  # wait without reaping: it stays a zombie
        if not is_running(zombie.pid):
            break
        time.sleep(0.05)
    path.write_text(f"{zombie.pid}\n")
    assert running_node(path) is None and clear_stale(path) and not path.exists()
    zombie.wait()
    other = subprocess.Popen(["sleep", "30"])
    try:
        path.write_text(str(other.pid))
        assert is_running(other.pid) and not is_gossip_node(other.pid)
        assert clear_stale(path) and not path.exists()
    finally:
        other.kill()
        other.wait()
    node_like = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "gossip"])
    try:
        path.write_text(str(node_like.pid))
        assert running_node(path) == node_like.pid
        assert not clear_stale(path) and path.exists()
    finally:
        node_like.kill()
        node_like.wait()
