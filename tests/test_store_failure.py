"""A node whose message log fails: persist before send, one refusal path, exit status 1.

In-process tests build a ``GossipNode`` on a ``MemoryReactorClock`` over a real
``LogStore`` whose file descriptor is swapped for ``/dev/full`` (every write then
fails with ENOSPC), and record what the link table is asked to send. The
process tests run ``gossip-node`` and ``twistd -n gossip`` with a file size
limit (``RLIMIT_FSIZE``: a write past it fails with EFBIG, as on a full disk).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clusterlib import write_cluster
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from gossip.core.frames import GossipFrame
from gossip.core.message import id_text, message_id
from gossip.node import GossipNode
from gossip.store.log import LogStore, StoreError
from gossip.topology import generate_config
from gossip.wire import codec

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


class Recorder:
    """Stands in for LinkTable.send: notes each payload frame and how many bytes the
    store still had buffered (not yet written) when it went out."""

    def __init__(self, store: LogStore) -> None:
        self.store = store
        self.gossip: list[tuple[int, int]] = []  # (peer, buffered bytes at send)

    def send(self, peer: int, data: bytes) -> bool:
        if isinstance(codec.decode(data), GossipFrame):
            self.gossip.append((peer, self.store.stats()["buffered_bytes"]))
        return True


def make_node(tmp_path: Path) -> tuple[GossipNode, MemoryReactorClock, Recorder, list[str]]:
    reactor = MemoryReactorClock()
    store = LogStore.open(tmp_path, fsync="batch", reactor=reactor)
    fatal: list[str] = []
    node = GossipNode(generate_config(4, name="t"), 1, store, reactor, on_fatal=fatal.append)
    links = Recorder(store)
    node.links.send = links.send  # type: ignore[method-assign]
    for peer in node.spec.neighbours:
        node._peer_up(peer)
    return node, reactor, links, fatal


def fill_disk(store: LogStore) -> None:
    full = os.open("/dev/full", os.O_RDWR)
    try:
        os.dup2(full, store._fd)  # every write now fails with ENOSPC
    finally:
        os.close(full)


def outcome(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_payloads_go_out_only_after_the_store_wrote_them(tmp_path: Path) -> None:
    """A flush (as after each read from a peer) writes what the store buffered before
    it sends the batched payloads: every Gossip frame leaves with nothing buffered."""
    node, reactor, links, fatal = make_node(tmp_path)
    node.submit(b"first")
    node.submit(b"second")
    assert node.store.stats()["buffered_bytes"] > 0
    node.flush()
    reactor.advance(0)
    assert links.gossip and all(buffered == 0 for _, buffered in links.gossip)
    assert fatal == []
    node.store.close()


@needs_dev_full
@pytest.mark.parametrize("first", ["flush", "end-of-turn write"])
def test_failed_end_of_turn_write_refuses_the_submit_and_forwards_nothing(
    tmp_path: Path, first: str
) -> None:
    """When the write of a turn's records fails (whether the node's flush or the store's
    own end-of-turn write comes first): the submit is refused with one line, no payload
    went to any neighbour, on_fatal fired once, later submits are refused the same way,
    and looking up the lost message finds nothing instead of raising."""
    node, reactor, links, fatal = make_node(tmp_path)
    answer = outcome(node.submit(b"doomed"))
    assert answer == []
    fill_disk(node.store)  # type: ignore[arg-type]
    if first == "flush":
        node.flush()
    reactor.advance(0)
    reactor.advance(1)
    (failure,) = answer
    assert isinstance(failure, Failure) and failure.check(StoreError)
    text = str(failure.value)
    assert "\n" not in text and "No space left on device" in text
    assert links.gossip == []
    assert fatal == [text]
    assert node.failed == text
    with pytest.raises(StoreError, match="No space left"):
        node.submit(b"later")
    assert node.submit_many([b"later", b"too"]) is not None
    assert node.find(id_text(message_id(b"doomed")), 5) == []
    assert message_id(b"doomed") not in node.store
    node.flush()
    reactor.advance(1)
    assert links.gossip == [] and len(fatal) == 1
    node.store._fd = os.open(os.devnull, os.O_RDWR)  # type: ignore[attr-defined]
    node.store.close()


# -- real processes ----------------------------------------------------------------

LIMIT = 16 * 1024  # bytes the node may write to any file
GCLIENT = [sys.executable, "-c", "import sys, gossip.client.cli as c; sys.exit(c.main())"]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _submit(config: Path, body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GCLIENT, "--config", str(config), "--id", "1", "--timeout", "10", "--message", body],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _wait_listening(config: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        status = subprocess.run(
            [*GCLIENT, "--config", str(config), "--id", "1", "--timeout", "2", "--status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if status.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("node did not come up within 20 s")


@pytest.mark.parametrize("runner", ["gossip-node", "twistd"])
def test_a_node_whose_disk_fills_exits_with_status_1(tmp_path: Path, runner: str) -> None:
    """A real node whose log cannot grow (file size limit): the submit that does not fit
    is refused with one line, the node exits with status 1 (so Restart=on-failure
    restarts it) and no traceback; what it acknowledged before is in its log."""
    config, _ = write_cluster(tmp_path, 4)
    data = tmp_path / "data"
    args = ["--id", "1", "--config", str(config), "--data-dir", str(data), "--fsync", "batch"]
    if runner == "twistd":
        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable))
        assert twistd is not None
        cmd = [twistd, "-n", "--pidfile=", "gossip", *args]
    else:
        cmd = [sys.executable, "-c", "import sys, gossip.tap; sys.exit(gossip.tap.run_node())"]
        cmd += args
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_limit_file_size,
    )
    try:
        _wait_listening(config, proc)
        kept = _submit(config, "fits")
        assert kept.returncode == 0, kept.stderr
        refused = None
        for i in range(10):  # each 4,000-byte message brings the log nearer the limit
            r = _submit(config, f"{i}" + "x" * 4000)
            if r.returncode != 0:
                refused = r
                break
        assert refused is not None, "the log never filled"
        assert refused.stderr.count("\n") == 1 and "not stored" in refused.stderr
        assert "File too large" in refused.stderr
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert "File too large" in output
    store = LogStore.open(data, fsync="never")
    try:
        assert message_id(b"fits") in store
    finally:
        store.close()
