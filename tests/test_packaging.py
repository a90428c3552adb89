"""Packaging: the twistd plugin is found, generated code is current, the wheel is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
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
    without an __init__.py that would shadow Twisted's own plugin package, and the
    LICENSE and the dashboard's static files; building it prints no setuptools
    deprecation warning."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__"),
    )
    (src / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "deprecat" not in (built.stdout + built.stderr).lower()
    (wheel,) = (tmp_path / "dist").glob("gossip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gossip-0.1.0.dist-info/licenses/LICENSE" in names
    assert "twisted/plugins/gossip_plugin.py" in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "gossip/wire/peer_pb2.pyi" in names
    for static in ("index.html", "dashboard.js", "dashboard.css"):
        assert f"gossip/web/static/{static}" in names


def _copy_tree(dest: Path) -> Path:
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__"),
    )
    return dest


def test_development_install_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    """The editable wheel that scripts/cluster and scripts/test install
    (``editable_mode=strict``: twisted/plugins stays visible to twistd) builds with no
    setuptools deprecation warning (``compat`` mode printed a page of them)."""
    src = _copy_tree(tmp_path / "src")
    r = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-c",
            "import sys; from setuptools import build_meta as b;"
            " print(b.build_editable(sys.argv[1], {'editable_mode': 'strict'}))",
            str(tmp_path / "dist"),
        ],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith(".whl")
    assert "deprecat" not in (r.stdout + r.stderr).lower(), r.stderr
    for script in ("cluster", "test"):
        text = (ROOT / "scripts" / script).read_text()
        assert "editable_mode=strict" in text and "editable_mode=compat" not in text


def test_license_file_matches_pyproject() -> None:
    """pyproject.toml declares the MIT licence as an SPDX string with LICENSE as its
    licence file, and LICENSE is the MIT text for the gossip authors."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the gossip authors\n")
    assert "Permission is hereby granted, free of charge" in text
