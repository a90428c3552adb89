"""One target's long fuzzing run, in its own process (``gossip.fuzz.cli`` starts it).

A process of its own, so that a hang, a crash or a memory blow-up ends only
this run, and so that atheris (libFuzzer, which exits the process when its time
is up) can be used. Progress goes to a JSON status file the parent reads:
``{"inputs": N, "failures": [{"signature", "hex", "file"}...]}``.

Engines: ``atheris`` (coverage-guided; hangs over ``INPUT_SECONDS`` and memory
over ``RSS_LIMIT_MB`` are libFuzzer's to catch) or ``random`` (the seed corpus
mutated at random by ``gossip.fuzz.harness``, a SIGALRM watchdog per input).
Both start from ``gossip.fuzz.inputs.seeds``: valid structures, damaged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import globalLogBeginner

from gossip.fuzz.harness import INPUT_SECONDS, MAX_INPUT_BYTES, apply_mutations, random_mutations

# Memory one run may reach (libFuzzer's -rss_limit_mb; the random engine checks it too).
RSS_LIMIT_MB = 2048
SEED_COUNT = 300


class Recorder:
    """Counts inputs and keeps one reproducer per distinct failure."""

    def __init__(self, target: str, out: Path, status: Path) -> None:
        self.target = target
        self.out = out
        self.status = status
        self.inputs = 0
        self.failures: list[dict[str, str]] = []
        self._seen: set[str] = set()
        self._written = 0.0

    def failed(self, data: bytes, error: BaseException) -> None:
        text = "".join(traceback.format_exception(error))
        first = str(error).splitlines()[0] if str(error) else ""
        signature = f"{type(error).__name__}: {first[:120]}"
        if signature in self._seen:
            return
        self._seen.add(signature)
        name = f"{self.target}-{hashlib.sha1(data).hexdigest()[:12]}"
        (self.out / f"{name}.hex").write_text(data.hex() + "\n")
        (self.out / f"{name}.txt").write_text(f"{self.target}\n{data.hex()}\n\n{text}")
        self.failures.append({"signature": signature, "hex": data.hex(), "file": f"{name}.hex"})
        self.write()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._written >= 1.0:
            self.write()

    def write(self) -> None:
        self._written = time.monotonic()
        tmp = self.status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inputs": self.inputs, "failures": self.failures}))
        os.replace(tmp, self.status)


def run_one(
    run: Callable[[bytes], None], rec: Recorder, data: bytes, timeout: float | None
) -> None:
    from gossip.fuzz.harness import watchdog

    rec.inputs += 1
    try:
        with watchdog(timeout):
            run(data)
    except Exception as e:  # every failure is recorded; the run goes on
        rec.failed(data, e)
    rec.tick()


def random_engine(
    run: Callable[[bytes], None], rec: Recorder, seeds: list[bytes], seconds: float, seed: int
) -> None:
    import resource

    rng = random.Random(seed)
    corpus = list(seeds) or [b""]
    deadline = time.monotonic() + seconds
    for data in corpus:
        run_one(run, rec, data, INPUT_SECONDS)
    while time.monotonic() < deadline:
        base = rng.choice(corpus)
        if rng.random() < 0.1:  # splice two inputs
            other = rng.choice(corpus)
            base = base[: rng.randrange(len(base) + 1)] + other[rng.randrange(len(other) + 1) :]
        data = apply_mutations(base, random_mutations(rng, rng.randint(1, 6)))
        run_one(run, rec, data, INPUT_SECONDS)
        if rec.inputs % 1000 == 0:
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            if rss_mb > RSS_LIMIT_MB:
                rec.failed(data, MemoryError(f"process memory reached {rss_mb} MiB"))
                return


def atheris_engine(
    run: Callable[[bytes], None], rec: Recorder, seeds: list[bytes], seconds: float, seed: int
) -> None:
    import atheris

    corpus = rec.out / f"corpus-{rec.target}"
    corpus.mkdir(exist_ok=True)
    for data in seeds:
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)

    def one_input(data: bytes) -> None:
        run_one(run, rec, data, None)  # libFuzzer's -timeout catches hangs

    argv = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={max(1, int(seconds))}",
        f"-timeout={int(INPUT_SECONDS)}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={MAX_INPUT_BYTES}",
        f"-seed={seed}",
        f"-artifact_prefix={rec.out}/{rec.target}-",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        rec.write()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("target")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--engine", choices=("atheris", "random"), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    started = time.monotonic()  # the budget includes building the corpus
    # Until logging begins, Twisted keeps the last 65,536 events, and each holds its
    # source (a whole node): a gigabyte that would hide a real leak from the RSS limit.
    # The targets capture the events they check themselves.
    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    if args.engine == "atheris":
        import atheris

        # Coverage of gossip's code and of the Twisted parsers it relies on guides
        # the fuzzer (instrumenting everything loaded would take minutes).
        with atheris.instrument_imports(include=["gossip", "twisted.protocols"]):
            from gossip.fuzz import inputs
            from gossip.fuzz.targets import TARGETS
    else:
        from gossip.fuzz import inputs
        from gossip.fuzz.targets import TARGETS

    rec = Recorder(args.target, args.out, args.status)
    rec.write()
    seeds = inputs.seeds(args.target, SEED_COUNT)
    engine: Any = atheris_engine if args.engine == "atheris" else random_engine
    left = max(1.0, args.seconds - (time.monotonic() - started))
    engine(TARGETS[args.target], rec, seeds, left, args.seed)
    rec.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
