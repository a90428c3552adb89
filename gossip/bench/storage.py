"""``gossip-bench-store``: append throughput and recovery time of the message log.

Appends 100-byte messages under each fsync policy ("always": each add fsyncs;
"batch": adds issued in chunks, each chunk acknowledged through
``when_durable`` with the real reactor running the fsyncs in a thread;
"never": no fsync; and "never" once more as a relay appends, ``add_many`` of
the columns of one frame at a time), then times ``LogStore.open`` (recovery)
on a log of ``--recovery-messages`` messages and measures the in-memory index
per message with tracemalloc. Prints a table; ``--json FILE`` writes the same figures.

``--memory N`` measures instead what a node pays in resident memory per stored
message: a fresh child process adds N 100-byte messages to an empty store
(fsync "never") and reports its RSS growth per message; a second fresh child
opens the log they made (recovery) and reports the time it took and its RSS
growth per message. Fresh processes, so that nothing else the benchmark
allocated is counted.

``--index N`` times the id index alone (``gossip/store/id_index.py``) with N
random ids: CPU nanoseconds per ``add_id``, per ``in`` of a held and of a new id
(fresh objects, as a decoded frame gives: their hash is not cached), per
``add_id`` of a held id and per ``position``.

Figures depend on the disk and the page cache: the recovery file was just
written, so it is read from memory, and "always"/"batch" measure the fsync
latency of whatever holds the ``--dir`` directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gossip.core.message import ID_BYTES, Message, message_id
from gossip.store.id_index import IdIndex
from gossip.store.log import LOG_NAME, MAGIC, LogStore, StoreError, encode_record

BODY_BYTES = 100
INDEX_SAMPLE = 100_000


def make_message(i: int, body_bytes: int = BODY_BYTES) -> Message:
    head = f"{i:012d} ".encode()
    body = head + b"x" * max(body_bytes - len(head), 0)
    return Message(message_id(body), body, 1.7e9 + i, (1, 2, 3))


def _messages(n: int, start: int = 0) -> list[Message]:
    return [make_message(i) for i in range(start, start + n)]


def _append_result(policy: str, store: LogStore, n: int, seconds: float) -> dict[str, Any]:
    stats = store.stats()
    return {
        "policy": policy,
        "messages": n,
        "seconds": seconds,
        "messages_per_second": n / seconds,
        "log_bytes": stats["file_bytes"] - len(MAGIC),
        "mb_per_second": (stats["file_bytes"] - len(MAGIC)) / seconds / 1e6,
        "fsyncs": stats["fsyncs"],
    }


def bench_sync(directory: Path, policy: str, n: int) -> dict[str, Any]:
    """Appends with "always" or "never": add returns once the policy is met."""
    messages = _messages(n)
    store = LogStore.open(directory, fsync=policy)
    try:
        started = time.perf_counter()
        for m in messages:
            store.add(m)
        seconds = time.perf_counter() - started
        return _append_result(policy, store, n, seconds)
    finally:
        store.close()


def bench_frames(directory: Path, n: int, frame: int) -> dict[str, Any]:
    """Appends as a relay makes them, fsync "never": ``add_many`` of the columns of
    frames of ``frame`` messages (one arrival time each)."""
    messages = _messages(n)
    frames = [
        (
            tuple(m.id for m in chunk),
            tuple(m.body for m in chunk),
            tuple(m.path for m in chunk),
            chunk[0].received_at,
        )
        for chunk in (messages[lo : lo + frame] for lo in range(0, n, frame))
    ]
    store = LogStore.open(directory, fsync="never")
    try:
        started = time.perf_counter()
        for ids, bodies, paths, received_at in frames:
            store.add_many(ids, bodies, paths, received_at)
        seconds = time.perf_counter() - started
        if len(store) != n:
            raise StoreError(f"the store holds {len(store)} of {n} messages")
        return {**_append_result("never", store, n, seconds), "frame": frame}
    finally:
        store.close()


async def bench_batch(directory: Path, n: int, chunk: int, reactor: Any) -> dict[str, Any]:
    """Appends with "batch": each chunk of adds is waited for through when_durable."""
    messages = _messages(n)
    store = LogStore.open(directory, fsync="batch", reactor=reactor)
    try:
        started = time.perf_counter()
        for lo in range(0, n, chunk):
            for m in messages[lo : lo + chunk]:
                store.add(m)
            await store.when_durable()
        seconds = time.perf_counter() - started
        return {**_append_result("batch", store, n, seconds), "chunk": chunk}
    finally:
        store.close()


def write_raw_log(directory: Path, n: int) -> int:
    """A log of ``n`` messages written directly (not through a store); its size."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOG_NAME
    with open(path, "wb") as f:
        f.write(MAGIC)
        step = 10_000
        for lo in range(0, n, step):
            f.write(b"".join(encode_record(make_message(i)) for i in range(lo, min(n, lo + step))))
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def bench_recovery(directory: Path, n: int) -> dict[str, Any]:
    size = write_raw_log(directory, n)
    started = time.perf_counter()
    store = LogStore.open(directory, fsync="never")
    seconds = time.perf_counter() - started
    try:
        assert len(store) == n, f"recovered {len(store)} of {n} messages"
    finally:
        store.close()
    return {
        "messages": n,
        "file_bytes": size,
        "seconds": seconds,
        "messages_per_second": n / seconds if seconds else float("inf"),
        "mb_per_second": size / seconds / 1e6 if seconds else float("inf"),
    }


def measure_index(directory: Path, n: int = INDEX_SAMPLE) -> float:
    """Bytes of memory (tracemalloc) the open store's index takes per message."""
    write_raw_log(directory, n)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = LogStore.open(directory, fsync="never")
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    store.close()
    return (after - before) / n


def rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_phase(phase: str, directory: Path, n: int) -> dict[str, Any]:
    """One phase of ``--memory``, run in a fresh process: "add" adds ``n`` messages to
    an empty store in ``directory``, "open" opens (recovers) the log they left."""
    gc.collect()
    before = rss_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    if phase == "add":
        clock = Clock()  # the end-of-turn writes: advanced by hand below
        store = LogStore.open(directory, fsync="never", reactor=clock)
        for i in range(n):
            store.add(make_message(i))
            if i % 10_000 == 9_999:
                store.write_buffered()
                clock.advance(0)
        store.write_buffered()
        clock.advance(0)
    else:
        store = LogStore.open(directory, fsync="never")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    gc.collect()
    after = rss_bytes()
    held = len(store)
    store.close()
    if held != n:
        raise StoreError(f"the store holds {held} of {n} messages")
    return {
        "phase": phase,
        "messages": n,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rss_before": before,
        "rss_after": after,
        "rss_bytes_per_message": (after - before) / n,
    }


def run_memory(base: Path, n: int) -> dict[str, Any]:
    """Both ``--memory`` phases, each in a child interpreter."""
    out: dict[str, Any] = {"messages": n, "body_bytes": BODY_BYTES, "directory": str(base)}
    for phase in ("add", "open"):
        argv = ["--memory", str(n), "--memory-phase", phase, "--dir", str(base / "memory")]
        code = f"import sys; from gossip.bench.storage import main; sys.exit(main({argv!r}))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            raise StoreError(f"the {phase} phase failed: {r.stderr.strip()[-500:]}")
        out[phase] = json.loads(r.stdout)
    return out


def format_memory(result: dict[str, Any]) -> str:
    add, opened = result["add"], result["open"]
    return "\n".join(
        [
            f"store memory: {result['messages']:,} messages of {result['body_bytes']} bytes"
            " (LogStore, fsync never), each phase in a fresh process",
            *(
                f"{r['phase']:<5} {r['seconds']:7.2f} s ({r['cpu_seconds']:.2f} s CPU)"
                f"  RSS +{(r['rss_after'] - r['rss_before']) / 1e6:6.1f} MB"
                f"  {r['rss_bytes_per_message']:6.1f} B/message"
                for r in (add, opened)
            ),
            "open = recovery: reads and checks every record (warm page cache) and builds"
            " the index.",
        ]
    )


def bench_index(n: int, probes: int = 100_000) -> dict[str, Any]:
    """CPU ns per operation of an ``IdIndex`` holding ``n`` random ids (see the module
    docstring); each figure is the best of three passes over ``probes`` ids."""
    rng = random.Random(11)
    ids = [rng.randbytes(ID_BYTES) for _ in range(n)]
    index = IdIndex()
    add = index.add_id
    started = time.process_time()
    for mid in ids:
        add(mid)
    add_ns = (time.process_time() - started) / n * 1e9
    count = min(probes, n)
    held = [bytes(bytearray(mid)) for mid in rng.sample(ids, count)]  # fresh objects
    new = [rng.randbytes(ID_BYTES) for _ in range(count)]
    index.position(ids[0])  # the ids wait in one batch for id order; not a lookup's cost

    def per_call(op: Callable[[bytes], object], probe: list[bytes]) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for mid in probe:
                op(mid)
            best = min(best, time.process_time() - started)
        return best / len(probe) * 1e9

    contains = index.__contains__
    return {
        "ids": n,
        "add_ns": add_ns,
        "in_held_ns": per_call(contains, held),
        "in_new_ns": per_call(contains, new),
        "add_held_ns": per_call(add, held),
        "position_ns": per_call(index.position, held),
    }


def format_index(r: dict[str, Any]) -> str:
    return (
        f"id index, {r['ids']:,} ids: CPU ns per add_id {r['add_ns']:.0f},"
        f" in (held) {r['in_held_ns']:.0f}, in (new) {r['in_new_ns']:.0f},"
        f" add_id (held) {r['add_held_ns']:.0f}, position {r['position_ns']:.0f}"
    )


def _run_in_reactor(make: Callable[[Any], Deferred[dict[str, Any]]]) -> dict[str, Any]:
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    out: dict[str, Any] = {}
    errors: list[BaseException] = []

    def start() -> None:
        d = make(reactor)
        d.addCallbacks(out.update, lambda f: errors.append(f.value))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    if errors:
        raise errors[0]
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"message log benchmark: {result['body_bytes']}-byte bodies"
        f" ({result['record_bytes']} bytes per record), in {result['directory']}",
        "",
        f"{'append':<8}{'messages':>10}{'seconds':>9}{'msg/s':>11}{'MB/s':>8}{'fsyncs':>8}",
    ]
    for r in result["append"]:
        label = f"{r['policy']}/{r['frame']}" if "frame" in r else r["policy"]
        lines.append(
            f"{label:<8}{r['messages']:>10,}{r['seconds']:>9.2f}"
            f"{r['messages_per_second']:>11,.0f}{r['mb_per_second']:>8.1f}{r['fsyncs']:>8,}"
        )
    rec = result["recovery"]
    lines += [
        "",
        f"{'recovery':<8}{'messages':>10}{'seconds':>9}{'msg/s':>11}{'MB/s':>8}{'MB':>8}",
        f"{'open':<8}{rec['messages']:>10,}{rec['seconds']:>9.2f}"
        f"{rec['messages_per_second']:>11,.0f}{rec['mb_per_second']:>8.1f}"
        f"{rec['file_bytes'] / 1e6:>8.1f}",
        "",
        f"index memory: {result['index_bytes_per_message']:.1f} bytes per message"
        f" (tracemalloc, {result['index_sample']:,} messages)",
        "MB/s counts log bytes (records with their headers); batch acks each chunk of"
        f" {result['batch_chunk']:,}",
        "through when_durable; never/N appends frames of N messages with add_many (a"
        " relay's appends);",
        "recovery reads a warm page cache.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gossip-bench-store",
        description="Append throughput per fsync policy and recovery time of the message log.",
    )
    p.add_argument("--always-messages", type=int, default=2_000, metavar="N")
    p.add_argument("--batch-messages", type=int, default=100_000, metavar="N")
    p.add_argument("--batch-chunk", type=int, default=1_000, metavar="N")
    p.add_argument("--never-messages", type=int, default=200_000, metavar="N")
    p.add_argument(
        "--frame",
        type=int,
        default=8,
        metavar="N",
        help="messages per add_many in the never/N row (default 8, as gossip-bench-hotpath"
        " --relay)",
    )
    p.add_argument(
        "--recovery-messages",
        type=int,
        default=1_000_000,
        metavar="N",
        help="messages in the log whose opening is timed (default 1,000,000)",
    )
    p.add_argument(
        "--memory",
        type=int,
        metavar="N",
        help="instead: RSS per stored message with N messages, and the time to open them",
    )
    p.add_argument("--memory-phase", choices=("add", "open"), help=argparse.SUPPRESS)
    p.add_argument(
        "--index",
        type=int,
        metavar="N",
        help="instead: CPU ns per operation of the id index alone, holding N ids",
    )
    p.add_argument("--dir", type=Path, help="where to write the logs (default: a temp dir)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)
    if args.memory is not None and args.memory < 1:
        p.error("--memory must be at least 1")
    if args.index is not None and args.index < 1:
        p.error("--index must be at least 1")
    if args.index is not None and args.memory is not None:
        p.error("--index and --memory are separate runs")
    if args.memory_phase is not None and (args.memory is None or args.dir is None):
        p.error("--memory-phase needs --memory and --dir")
    for name in ("always_messages", "batch_messages", "batch_chunk", "never_messages", "frame"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.recovery_messages < 1:
        p.error("--recovery-messages must be at least 1")
    return args


def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    appends = [
        bench_sync(base / "always", "always", args.always_messages),
    ]

    def batch(reactor: Any) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(
            bench_batch(base / "batch", args.batch_messages, args.batch_chunk, reactor)
        )

    appends.append(_run_in_reactor(batch))
    appends.append(bench_sync(base / "never", "never", args.never_messages))
    appends.append(bench_frames(base / "frames", args.never_messages, args.frame))
    recovery = bench_recovery(base / "recovery", args.recovery_messages)
    return {
        "body_bytes": BODY_BYTES,
        "record_bytes": len(encode_record(make_message(0))),
        "directory": str(base),
        "batch_chunk": args.batch_chunk,
        "append": appends,
        "recovery": recovery,
        "index_bytes_per_message": measure_index(base / "index"),
        "index_sample": INDEX_SAMPLE,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_phase is not None:
        print(json.dumps(memory_phase(args.memory_phase, args.dir, args.memory)))
        return 0
    if args.index is not None:
        result = bench_index(args.index)
        print(format_index(result))
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    def measure(base: Path) -> dict[str, Any]:
        return run(args, base) if args.memory is None else run_memory(base, args.memory)

    try:
        if args.dir is not None:
            args.dir.mkdir(parents=True, exist_ok=True)
            base = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
            result = measure(base)
        else:
            with tempfile.TemporaryDirectory(prefix="gossip-bench-store-") as d:
                result = measure(Path(d))
    except (StoreError, OSError) as e:
        print(f"gossip-bench-store: {e}", file=sys.stderr)
        return 1
    print(format_table(result) if args.memory is None else format_memory(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
