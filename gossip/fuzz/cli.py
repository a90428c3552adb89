"""``gossip-fuzz``: run the fuzz targets for a long budget and report what was tried.

Each target runs in a child process (``gossip.fuzz.worker``) for ``--seconds``;
the line printed per target gives the inputs tried and the distinct failures,
each saved as ``TARGET-<sha1>.hex`` (the input) and ``.txt`` (with the
traceback) in ``--out``. ``--replay TARGET HEX`` runs one saved input again.
Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

from gossip.fuzz.harness import INPUT_SECONDS, watchdog

TARGET_NAMES = ("codec", "peer", "core", "amp", "log")
# A child that has not ended this long after its budget is stopped and reported.
GRACE_SECONDS = 120.0
# Runs of one target restarted after libFuzzer stopped on a hang, crash or memory limit.
MAX_RESTARTS = 3


def engine_for(choice: str) -> str:
    if choice != "auto":
        return choice
    return "atheris" if importlib.util.find_spec("atheris") is not None else "random"


def run_target(target: str, seconds: float, engine: str, out: Path, seed: int) -> dict[str, object]:
    """Run ``target`` for ``seconds`` (restarting after a libFuzzer stop); its totals."""
    total = 0
    failures: list[dict[str, str]] = []
    started = time.monotonic()
    for attempt in range(MAX_RESTARTS + 1):
        left = seconds - (time.monotonic() - started)
        if left < 1:
            break
        status = out / f"status-{target}.json"
        log = out / f"{target}-run{attempt}.log"
        before = set(out.glob(f"{target}-crash-*")) | set(out.glob(f"{target}-timeout-*"))
        before |= set(out.glob(f"{target}-oom-*"))
        cmd = [
            sys.executable,
            "-m",
            "gossip.fuzz.worker",
            target,
            f"--seconds={left:.0f}",
            f"--engine={engine}",
            f"--out={out}",
            f"--status={status}",
            f"--seed={seed + attempt}",
        ]
        with open(log, "wb") as err:
            child = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
            try:
                code = child.wait(timeout=left + GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                code = -9
        state = json.loads(status.read_text()) if status.exists() else {}
        text = log.read_text(errors="replace")
        done = [int(n) for n in re.findall(r"Done (\d+) runs", text)]
        total += max([int(state.get("inputs", 0)), *done])
        failures += state.get("failures", [])
        found = set(out.glob(f"{target}-crash-*")) | set(out.glob(f"{target}-timeout-*"))
        found |= set(out.glob(f"{target}-oom-*"))
        for path in sorted(found - before):
            kind = path.name.split("-")[1]
            failures.append(
                {
                    "signature": f"libFuzzer {kind}",
                    "hex": path.read_bytes().hex(),
                    "file": path.name,
                }
            )
        if code == 0:
            break
        if not found - before:
            failures.append(
                {
                    "signature": f"worker exited with status {code} (see {log.name})",
                    "hex": "",
                    "file": log.name,
                }
            )
            break
    return {"inputs": total, "seconds": time.monotonic() - started, "failures": failures}


def replay(target: str, data: str) -> int:
    from gossip.fuzz.targets import TARGETS

    path = Path(data.removeprefix("@"))
    text = path.read_text() if data.startswith("@") or path.is_file() else data
    raw = bytes.fromhex(text.split()[0] if text.strip() else "")
    try:
        with watchdog(INPUT_SECONDS):
            TARGETS[target](raw)
    except Exception:
        traceback.print_exc()
        return 1
    print(f"{target}: input of {len(raw)} bytes passes")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="gossip-fuzz",
        description="Fuzz the frame decoder, the peer port, the core, the client port and "
        "the log reader; print the inputs tried per target and any failures.",
    )
    p.add_argument(
        "--target",
        choices=(*TARGET_NAMES, "all"),
        action="append",
        help="a target, or all (the default); repeat for several",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="budget per target (default 60)")
    p.add_argument(
        "--engine",
        choices=("auto", "atheris", "random"),
        default="auto",
        help="atheris (coverage-guided, if installed; the default) or random mutation",
    )
    p.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where inputs go")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--replay",
        nargs=2,
        metavar=("TARGET", "HEX"),
        help="run one input: its hex, or a saved .hex file",
    )
    args = p.parse_args(argv)
    if args.replay:
        return replay(*args.replay)
    chosen = args.target or ["all"]
    names = TARGET_NAMES if "all" in chosen else tuple(dict.fromkeys(chosen))
    engine = engine_for(args.engine)
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"fuzzing {', '.join(names)} for {args.seconds:g} s each with {engine}", end="")
    print(f"; output in {args.out}")
    failed = 0
    for target in names:
        result = run_target(target, args.seconds, engine, args.out, args.seed)
        failures = result["failures"]
        assert isinstance(failures, list)
        print(
            f"{target}: {result['inputs']} inputs in {result['seconds']:.0f} s,"
            f" {len(failures)} failures",
            flush=True,
        )
        for f in failures:
            print(f"  {f['signature']}  -> {args.out / f['file']}")
        failed += len(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
