"""Which cluster and node a data directory belongs to: the ``identity`` file beside the log.

A data directory holds one node's messages of one cluster. Opening it with
another cluster's file would gossip that cluster's messages into this one, so
the first node to use a directory records who it is::

    # written by gossip when this data directory was first used; do not edit
    cluster = "local"
    node = 3

and every later start compares: another cluster name or node id is refused
with one line (``IdentityMismatch``). A directory that has a log but no
identity file (made before this file existed) is adopted by the first node
that opens it. The file is written atomically (temporary file, fsync,
``os.replace``), so it is either absent or whole. The log format itself
(``gossip/store/log.py``) is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from pathlib import Path

import attrs

IDENTITY_NAME = "identity"


class IdentityMismatch(Exception):
    """The data directory belongs to another cluster or node; one line for the operator."""


@attrs.frozen
class Identity:
    cluster: str
    node: int


def identity_text(identity: Identity) -> str:
    # json.dumps of a str is a valid TOML basic string (\uXXXX escapes included).
    return (
        "# written by gossip when this data directory was first used; do not edit\n"
        f"cluster = {json.dumps(identity.cluster)}\n"
        f"node = {identity.node}\n"
    )


def read_identity(directory: Path) -> Identity | None:
    """The recorded identity, or None when the directory has none yet.

    A file that cannot be parsed raises ``IdentityMismatch`` naming it: it is
    never silently replaced.
    """
    path = directory / IDENTITY_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise IdentityMismatch(f"{path}: cannot read: {e}") from None
    try:
        data = tomllib.loads(text)
        cluster, node = data["cluster"], data["node"]
        if not isinstance(cluster, str) or not isinstance(node, int) or isinstance(node, bool):
            raise TypeError
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        raise IdentityMismatch(
            f'{path}: not a gossip identity file (expected cluster = "NAME" and node = ID)'
        ) from None
    return Identity(cluster, node)


def claim(directory: Path, identity: Identity, config_source: str = "the cluster file") -> bool:
    """Check that ``directory`` belongs to ``identity``, recording it on first use.

    Returns True when the identity file was written now. Raises ``IdentityMismatch``
    when the directory belongs to another cluster or node.
    """
    found = read_identity(directory)
    if found is not None:
        if found.cluster != identity.cluster:
            raise IdentityMismatch(
                f"data directory {directory} belongs to cluster {found.cluster!r}, not"
                f" {identity.cluster!r} ({config_source}): use that cluster's file or"
                " another --data-dir"
            )
        if found.node != identity.node:
            raise IdentityMismatch(
                f"data directory {directory} belongs to node {found.node} of cluster"
                f" {found.cluster!r}, not node {identity.node}: use --id {found.node}"
                " or another --data-dir"
            )
        return False
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / IDENTITY_NAME
    tmp = directory / f"{IDENTITY_NAME}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(identity_text(identity))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return True
