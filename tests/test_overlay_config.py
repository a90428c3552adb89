"""Cluster-file and command-line settings of the dynamic overlay."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from gossip.config import ConfigError, dump_config, parse_config
from gossip.tap import Options, join_addresses

JOINER = """
[cluster]
name = "c"
overlay = "dynamic"
replace_after = 4.5
join = ["tcp:host=10.0.0.4:port=17001"]

[[node]]
id = 17
host = "127.0.0.1"
peer_port = 17017
client_port = 17117
neighbours = []
"""


def test_a_joiners_file_may_name_only_itself() -> None:
    """In the dynamic overlay a file may give a node no neighbours (one joining through
    seeds); the overlay settings are read, and the file round-trips through dump."""
    config = parse_config(JOINER)
    assert config.overlay == "dynamic" and config.replace_after == 4.5
    assert config.join == ("tcp:host=10.0.0.4:port=17001",)
    assert config.nodes[17].neighbours == ()
    assert parse_config(dump_config(config)) == config


def test_static_mode_keeps_the_degree_rule_and_the_defaults() -> None:
    """Without overlay = "dynamic" a node with no neighbours is still an error, and the
    defaults are the static overlay with no seeds."""
    with pytest.raises(ConfigError, match="neighbours"):
        parse_config(JOINER.replace('overlay = "dynamic"\n', ""))
    text = JOINER.replace('overlay = "dynamic"\n', "").replace("neighbours = []", "")
    text = text.replace("replace_after = 4.5\n", "").replace(
        'join = ["tcp:host=10.0.0.4:port=17001"]\n', ""
    )
    config = parse_config(
        text.replace("[[node]]", "allow_any_degree = true\n[[node]]").replace(
            "client_port = 17117\n", "client_port = 17117\nneighbours = []\n"
        )
    )
    assert config.overlay == "static" and config.join == ()


JOIN_LINE = 'join = ["tcp:host=10.0.0.4:port=17001"]'


@pytest.mark.parametrize(
    "old, new, problem",
    [
        (JOIN_LINE, 'join = "tcp:host=a:port=1"', "expected a list of endpoint descriptions"),
        (JOIN_LINE, 'join = ["nonsense:x"]', r"cluster.join\[1\]: not a client endpoint"),
        ('overlay = "dynamic"', 'overlay = "mesh"', "unknown overlay 'mesh'"),
        (JOIN_LINE, "overlay_max_degree = 2", "out of range"),
    ],
)
def test_bad_overlay_settings_are_one_line_errors(old: str, new: str, problem: str) -> None:
    """Each bad overlay setting is a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=problem):
        parse_config(JOINER.replace(old, new))


def test_join_flag_takes_host_port_and_descriptions() -> None:
    """--join takes host:port (IPv6 in brackets) and endpoint descriptions, comma-separated;
    anything else is a usage error."""
    assert join_addresses("10.0.0.4:17001, [::1]:7001,tcp:host=a:port=5") == (
        "tcp:host=10.0.0.4:port=17001",
        "tcp:host=\\:\\:1:port=7001",
        "tcp:host=a:port=5",
    )
    for bad in ("10.0.0.4", "host:port", "", "x:99999"):
        with pytest.raises(usage.UsageError, match="--join"):
            join_addresses(bad)


def test_gossip_node_join_needs_the_dynamic_overlay(tmp_path: Path) -> None:
    """gossip-node --join overrides cluster.join; with a static cluster file it is a
    usage error saying what to set."""
    path = tmp_path / "cluster.toml"
    path.write_text(JOINER)
    options = Options()
    options.parseOptions(
        ["--id", "17", "--config", str(path), "--memory", "--join", "10.0.0.9:17001"]
    )
    assert options.cluster.join == ("tcp:host=10.0.0.9:port=17001",)
    static = tmp_path / "static.toml"
    static.write_text(
        JOINER.replace('overlay = "dynamic"\n', "allow_any_degree = true\n").replace(
            'join = ["tcp:host=10.0.0.4:port=17001"]\n', ""
        )
    )
    with pytest.raises(usage.UsageError, match='overlay = "dynamic"'):
        Options().parseOptions(
            ["--id", "17", "--config", str(static), "--memory", "--join", "10.0.0.9:17001"]
        )
