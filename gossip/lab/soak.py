"""``gossip-soak``: the random nemesis for hours against a lab of nodes in network
namespaces, printing the checker's figures every minute and at the end.

Needs root, ``ip`` and ``nft``. Exit status 0 when every check passed, 1 when
one failed (it goes on to the end unless ``--stop-on-failure``), 2 when the lab
cannot be built.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from gossip.lab.checker import CheckResult, summary
from gossip.lab.lab import Lab, LabFailed
from gossip.lab.nemesis import run_nemesis
from gossip.lab.netns import LabError, unavailable

REPORT_EVERY = 60.0


def duration(text: str) -> float:
    """Seconds from '90', '90s', '30m' or '2h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h)") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gossip-soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=duration, default=3600.0, help="e.g. 30m, 2h (default 1h)")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--rate", type=float, default=3.0, help="submits a second per node")
    p.add_argument("--seed", type=int, default=None, help="nemesis seed (default: random)")
    p.add_argument("--dir", help="where node logs and data go (default: a new temp dir)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds to converge per heal")
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument(
        "--overlay",
        choices=("static", "dynamic"),
        default="static",
        help="the cluster's overlay (dynamic: nodes replace unreachable neighbours)",
    )
    p.add_argument(
        "--replace-after",
        type=duration,
        default=None,
        help="with --overlay dynamic: seconds before an unreachable neighbour is replaced",
    )
    return p


def lab_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The cluster settings the options ask for (none for the default static overlay)."""
    out: dict[str, Any] = {}
    if args.overlay != "static":
        out["overlay"] = args.overlay
    if args.replace_after is not None:
        out["replace_after"] = args.replace_after
    return out


def figures(results: list[CheckResult], elapsed: float) -> str:
    s = summary(results)
    return (
        f"[{elapsed / 60:6.1f} min] heals {s['heals']}, acknowledged {s['acknowledged']},"
        f" lost {s['lost']}, converge mean {s['converge_mean']:.1f} s"
        f" max {s['converge_max']:.1f} s, link flaps {s['flaps']}, problems {s['problems']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.replace_after is not None and args.overlay == "static":
        p.error("--replace-after needs --overlay dynamic")
    why = unavailable()
    if why:
        print(f"gossip-soak: {why}", file=sys.stderr)
        return 2
    directory = Path(args.dir or tempfile.mkdtemp(prefix="gossip-soak-"))
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    status = [0]

    async def run(reactor: Any) -> None:
        lab = Lab(reactor, directory, args.nodes, settings=lab_settings(args))
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: defer.Deferred.fromCoroutine(lab.stop())
        )
        print(
            f"gossip-soak: seed {seed}, {args.nodes} nodes, {args.overlay} overlay,"
            f" logs in {directory}",
            flush=True,
        )
        try:
            await lab.start()
        except (LabError, LabFailed) as e:
            print(f"gossip-soak: {e}", file=sys.stderr)
            status[0] = 2
            await lab.stop()
            return
        results: list[CheckResult] = []
        started = time.monotonic()

        def report() -> None:
            print(figures(results, time.monotonic() - started), flush=True)

        def on_round(what: str, result: CheckResult) -> None:
            results.append(result)
            problems = result.problems()
            if problems:
                status[0] = 1
                print(f"FAIL {result.line()}: {'; '.join(problems)}", flush=True)
                if args.stop_on_failure:
                    raise LabFailed(problems[0])

        ticker = task.LoopingCall(report)
        ticker.clock = reactor
        ticker.start(REPORT_EVERY, now=False)
        try:
            await lab.load(args.rate)
            await run_nemesis(lab, args.duration, random.Random(seed), on_round, args.deadline)
        except LabFailed as e:
            why = "interrupted" if lab.torn_down else f"stopped: {e}"
            print(f"gossip-soak: {why}", file=sys.stderr)
            status[0] = 1
        finally:
            ticker.stop()
            print("final " + figures(results, time.monotonic() - started), flush=True)
            with contextlib.suppress(LabFailed):
                await lab.load(0)
            await lab.stop()

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            status[0] = status[0] or 1
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
