"""Packaging: the twistd plugin is found, generated code is current, the wheel is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_twistd_lists_the_gossip_plugin(tmp_path: Path) -> None:
    """After the install the suite runs against, ``twistd --help`` lists ``gossip``
    (run from an unrelated directory, so the source tree is not on the path)."""
    out = subprocess.run(
        [str(BIN / "twistd"), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "gossip" in out and "Run one node of a gossip cluster." in out


def test_gossip_node_runs_without_plugin_discovery(tmp_path: Path) -> None:
    """``gossip-node`` (what systemd units use) parses options without twistd: a bad
    --id is a one-line usage error with exit status 2."""
    r = subprocess.run(
        [str(BIN / "gossip-node"), "--id", "x"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["gossip-node: --id must be an integer, got 'x'"]


def test_generated_protobuf_code_is_current(tmp_path: Path) -> None:
    """Regenerating from protos/ with scripts/gen-protos gives exactly the committed files."""
    pytest.importorskip("grpc_tools")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        check=True,
        env={"PATH": f"{BIN}:/usr/bin:/bin"},
    )
    for name in ("peer_pb2.py", "peer_pb2.pyi"):
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "gossip" / "wire" / name).read_text()
        assert fresh == committed, f"gossip/wire/{name} is stale: run scripts/gen-protos"


def test_wheel_has_plugin_and_no_plugin_cache(tmp_path: Path) -> None:
    """The wheel ships twisted/plugins/gossip_plugin.py without any dropin.cache and
    without an __init__.py that would shadow Twisted's own plugin package."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__"),
    )
    (src / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("gossip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/gossip_plugin.py" in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "gossip/wire/peer_pb2.pyi" in names
