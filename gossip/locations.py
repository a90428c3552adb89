"""Where a node and the client look for things when not told.

The launcher writes its cluster file and node data under one state directory
so that ``gclient --id 1 ...`` works from any directory without flags.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$GOSSIP_HOME``, else ``$XDG_STATE_HOME/gossip``, else ``~/.local/state/gossip``."""
    home = os.environ.get("GOSSIP_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "gossip"


def default_config() -> Path:
    """``$GOSSIP_CONFIG``, else ``cluster.toml`` in the state directory."""
    explicit = os.environ.get("GOSSIP_CONFIG")
    return Path(explicit) if explicit else state_dir() / "cluster.toml"


def default_data_dir(node_id: int) -> Path:
    return state_dir() / f"node-{node_id}"
