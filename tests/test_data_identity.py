"""A data directory belongs to one node of one cluster (its ``identity`` file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import task

from gossip.config import dump_config
from gossip.node import StartupError
from gossip.store.identity import (
    IDENTITY_NAME,
    Identity,
    IdentityMismatch,
    claim,
    read_identity,
)
from gossip.store.log import LogStore
from gossip.tap import Options, build_node
from gossip.topology import generate_config

BIN = Path(sys.executable).parent


def _config(tmp_path: Path, name: str, base: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_config(generate_config(4, name=name, base_peer_port=base)))
    return path


def _options(config: Path, node: int, data: Path) -> Options:
    options = Options()
    options.parseOptions(["--id", str(node), "--config", str(config), "--data-dir", str(data)])
    return options


def test_first_use_records_the_cluster_and_node(tmp_path: Path) -> None:
    """The first node to open a data directory writes its cluster name and node id; the
    same node opens it again without complaint."""
    data = tmp_path / "data"
    assert claim(data, Identity("local", 3)) is True
    assert read_identity(data) == Identity("local", 3)
    assert claim(data, Identity("local", 3)) is False


def test_a_directory_of_another_cluster_or_node_is_refused(tmp_path: Path) -> None:
    """Another cluster name, or another node id, is refused with one line naming the
    directory and the owner; a damaged identity file is refused, never replaced."""
    data = tmp_path / "data"
    claim(data, Identity("local", 3))
    with pytest.raises(IdentityMismatch) as e:
        claim(data, Identity("other", 3), "other.toml")
    assert str(e.value) == (
        f"data directory {data} belongs to cluster 'local', not 'other' (other.toml):"
        " use that cluster's file or another --data-dir"
    )
    with pytest.raises(IdentityMismatch, match="belongs to node 3 of cluster 'local', not node 4"):
        claim(data, Identity("local", 4))
    (data / IDENTITY_NAME).write_text("garbage = [")
    with pytest.raises(IdentityMismatch, match="not a gossip identity file"):
        claim(data, Identity("local", 3))
    assert (data / IDENTITY_NAME).read_text() == "garbage = ["


def test_a_log_from_before_identity_files_is_adopted(tmp_path: Path) -> None:
    """A data directory with a log but no identity file (made by an older version) is
    claimed by the first node that opens it, keeping its messages."""
    data = tmp_path / "data"
    config = _config(tmp_path, "local", 29500)
    store = LogStore.open(data, fsync="never", reactor=task.Clock())
    store.close()
    assert read_identity(data) is None
    node = build_node(_options(config, 2, data), task.Clock())
    node.store.close()
    assert read_identity(data) == Identity("local", 2)


def test_gossip_node_refuses_another_clusters_data_directory(tmp_path: Path) -> None:
    """``gossip-node --config other.toml`` on a data directory of cluster 'local' exits
    with status 1 and one line, before reading that cluster's log (before, it opened the
    log and would have gossiped its messages into the other cluster)."""
    data = tmp_path / "node-1"
    node = build_node(_options(_config(tmp_path, "local", 29520), 1, data), task.Clock())
    node.store.close()
    other = _config(tmp_path, "other", 29540)
    with pytest.raises(StartupError, match="belongs to cluster 'local', not 'other'"):
        build_node(_options(other, 1, data), task.Clock())
    r = subprocess.run(
        [str(BIN / "gossip-node"), "--id", "1", "--config", str(other), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"gossip-node: data directory {data} belongs to cluster 'local', not 'other'"
        f" ({other}): use that cluster's file or another --data-dir"
    ]
