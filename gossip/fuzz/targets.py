"""The fuzz targets by name: each takes one input (bytes) and raises ``FuzzFailure``."""

from __future__ import annotations

from collections.abc import Callable

from gossip.fuzz.amp_target import amp_stream
from gossip.fuzz.frame_targets import core_events, decode_frame
from gossip.fuzz.log_target import log_file
from gossip.fuzz.peer_target import peer_stream

TARGETS: dict[str, Callable[[bytes], None]] = {
    "codec": decode_frame,
    "peer": peer_stream,
    "core": core_events,
    "amp": amp_stream,
    "log": log_file,
}
