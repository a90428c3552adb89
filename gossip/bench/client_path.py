"""``python -m gossip.bench.client_path``: what the client path costs a node per message.

One ``GossipNode`` (log store, fsync "never", no neighbours up) on a fake clock,
its ``ClientProtocol`` fed ready-made AMP boxes, one box per read as a client's
socket delivers them; the answers are taken and dropped. Each way of submitting
is timed on the same bodies in CPU time (``time.process_time``), so the
difference between a way and ``core`` (``GossipNode.submit_many`` called
directly, no AMP) is what the AMP path adds per message at the submitting node:

- ``core``: 16 bodies per ``submit_many`` and one ``flush``, no AMP;
- ``submit``: one ``Submit`` box per message (``gclient``, or a client without
  a reactor);
- ``pipe16``, ...: ``Submit`` boxes, N of them per read (a client that pipelines
  single submits; the node enters those of one read as one batch);
- ``many16``, ``many64``, ...: one ``SubmitMany`` box per N messages
  (``GossipClient.submit_messages``, or ``submit_message`` calls in one turn).

It runs in one process with no sockets, so it is steadier than ``gossip-bench``
on a busy machine; read the ratios, the absolute figures follow the load.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp

from gossip.argtypes import OneLineParser, whole
from gossip.bench.cluster import make_body
from gossip.client.responder import ClientLimits, ClientProtocol
from gossip.node import GossipNode
from gossip.store.log import LogStore
from gossip.topology import generate_config

CORE_BATCH = 16  # bodies per submit_many in the ``core`` way
WAYS = ("core", "submit", "pipe16", "many16", "many64")
# No client bound may refuse or hold a submit here: every way must store everything.
UNBOUNDED = ClientLimits(submit_rate=1e12, submit_burst=1e12, outstanding=1 << 40)


def submit_boxes(bodies: list[str]) -> list[bytes]:
    return [
        amp.AmpBox(_command=b"Submit", _ask=b"%d" % i, body=b.encode()).serialize()
        for i, b in enumerate(bodies)
    ]


def submit_many_boxes(bodies: list[str], per_box: int) -> list[bytes]:
    out = []
    as_list = amp.ListOf(amp.Unicode())
    for j, i in enumerate(range(0, len(bodies), per_box)):
        box = amp.AmpBox(_command=b"SubmitMany", _ask=b"%d" % j)
        box[b"bodies"] = as_list.toStringProto(bodies[i : i + per_box], None)
        out.append(box.serialize())
    return out


def measure(way: str, bodies: list[str]) -> float:
    """CPU seconds per message for submitting ``bodies`` to a fresh node ``way``."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = MemoryReactorClock()
        clock.advance(1000.0)
        store = LogStore.open(Path(tmp), fsync="never", reactor=clock)
        node = GossipNode(generate_config(16, name="client-path"), 1, store, clock)
        transport = StringTransport()
        proto = ClientProtocol(node, UNBOUNDED)
        proto.makeConnection(transport)
        run: Callable[[], None]
        if way == "core":
            raw = [b.encode() for b in bodies]
            chunks = [raw[i : i + CORE_BATCH] for i in range(0, len(raw), CORE_BATCH)]

            def run() -> None:
                for chunk in chunks:
                    node.submit_many(chunk)
                    node.flush()
        else:
            if way == "submit":
                boxes = submit_boxes(bodies)
            elif way.startswith("pipe"):
                single = submit_boxes(bodies)
                n = int(way.removeprefix("pipe"))
                boxes = [b"".join(single[i : i + n]) for i in range(0, len(single), n)]
            else:
                boxes = submit_many_boxes(bodies, int(way.removeprefix("many")))

            def run() -> None:
                for data in boxes:
                    proto.dataReceived(data)  # one read per box
                    clock.advance(0)  # the end of the reactor turn: the node's flush
                    transport.clear()

        start = time.process_time()
        run()
        clock.advance(0)
        used = time.process_time() - start
        if len(store) != len(bodies):
            raise RuntimeError(f"{way}: stored {len(store)} of {len(bodies)}")
        store.close()
        return used / len(bodies)


def _way(text: str) -> str:
    if text in ("core", "submit"):
        return text
    for prefix in ("many", "pipe"):
        if text.startswith(prefix) and text[4:].isdigit():
            if int(text[4:]) < 1:
                raise argparse.ArgumentTypeError(f"{text}: at least {prefix}1")
            return text
    raise argparse.ArgumentTypeError(f"unknown way {text!r} (core, submit, pipeN, manyN)")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m gossip.bench.client_path",
        description="CPU per message a node spends on submits, by way of submitting.",
    )
    p.add_argument("--messages", type=whole(low=1), default=20_000, metavar="N")
    p.add_argument("--rounds", type=whole(low=1), default=3, help="runs per way (least kept)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated ({','.join(WAYS)})")
    args = p.parse_args(argv)
    try:
        ways = [_way(w.strip()) for w in args.ways.split(",") if w.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--ways: {e}")
    rng = random.Random(7)
    bodies = [make_body(rng, i, "c") for i in range(args.messages)]
    best = {w: min(measure(w, bodies) for _ in range(args.rounds)) for w in ways}
    core = best.get("core")
    print(f"{'way':<10}{'us/msg at the node':>20}{'over core':>12}")
    for w in ways:
        over = "" if core is None else f"{(best[w] - core) * 1e6:.1f}"
        print(f"{w:<10}{best[w] * 1e6:>20.1f}{over:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
