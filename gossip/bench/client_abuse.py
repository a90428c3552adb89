"""Client-port abuse on a real node: its memory and its client latency, as figures.

    python -m gossip.bench.client_abuse [--tree DIR] [--scenario flood,stall]

Starts ``gossip-node`` processes on loopback (ports 28xxx, ``--memory``) from the
source tree ``--tree`` (default: this one), so the same command measures two
versions of the code. Two scenarios (issue 12, items 5 and 6):

- ``flood``: a node holding 200 messages of 30 KB; one client sends
  ``--flood-mb`` of pipelined ``ListMessages`` requests and never reads.
- ``stall``: a node whose only neighbour (played by this script) completes the
  handshake, pings every 2 s and never reads, while a client submits 16 KB
  messages one at a time; the neighbour reconnects whenever it is dropped.

During each, a prober opens a new connection every 0.5 s and asks ``Status``
(what ``gclient --status`` does, 2 s deadline), and the node's RSS is sampled.
Printed per scenario: RSS before and at peak, probe latency p50 and max, probes
unanswered and the longest time without an answer; for ``stall`` also submits
answered, refused busy and timed out, and links dropped. Bounded: each scenario
runs ``--seconds`` and every wait has a deadline.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from gossip.wire import codec

HERE = Path(__file__).resolve().parents[2]
CLUSTER = "abuse"
PEER_PORT, CLIENT_PORT = 28001, 28101
PROBE_EVERY, PROBE_DEADLINE = 0.5, 2.0


# -- a minimal blocking AMP client (no reactor: the figures are about the node) -----


def amp_box(**fields: bytes) -> bytes:
    out = b""
    for k, v in fields.items():
        key = k.encode()
        out += struct.pack("!H", len(key)) + key + struct.pack("!H", len(v)) + v
    return out + b"\x00\x00"


def take_box(buf: bytes) -> tuple[dict[bytes, bytes], bytes] | None:
    box: dict[bytes, bytes] = {}
    i = 0
    while True:
        if len(buf) < i + 2:
            return None
        (n,) = struct.unpack_from("!H", buf, i)
        i += 2
        if n == 0:
            return box, buf[i:]
        if len(buf) < i + n + 2:
            return None
        key = buf[i : i + n]
        i += n
        (m,) = struct.unpack_from("!H", buf, i)
        i += 2
        if len(buf) < i + m:
            return None
        box[key] = buf[i : i + m]
        i += m


def amp_call(sock: socket.socket, command: bytes, **args: bytes) -> dict[bytes, bytes]:
    sock.sendall(amp_box(_command=command, _ask=b"1", **args))
    buf = b""
    while True:
        got = take_box(buf)
        if got is not None:
            return got[0]
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before answering")
        buf += data


# -- nodes -----------------------------------------------------------------------


def cluster_file(path: Path, nodes: int) -> None:
    lines = [f'[cluster]\nname = "{CLUSTER}"\nallow_any_degree = true\n']
    for n in range(1, nodes + 1):
        others = [m for m in range(1, nodes + 1) if m != n]
        lines.append(
            f'[[node]]\nid = {n}\nhost = "127.0.0.1"\npeer_port = {PEER_PORT + n - 1}\n'
            f"client_port = {CLIENT_PORT + n - 1}\nneighbours = {others}\n"
        )
    path.write_text("\n".join(lines))


def wait_until_listening(
    port: int, proc: subprocess.Popen[bytes], why: Callable[[], str], timeout: float = 20.0
) -> None:
    """Wait until ``port`` on loopback takes connections (the node ``proc`` started);
    RuntimeError saying ``why()`` if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not start: {why()}") from None
            time.sleep(0.1)


@contextmanager
def node_process(tree: Path, config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = "import sys; from gossip.tap import run_node; sys.exit(run_node())"
    args = [sys.executable, "-c", code, "--id", "1", "--config", str(config), "--memory"]
    with log.open("wb") as err:
        # cwd: with -c, the working directory comes first on sys.path, before --tree.
        proc = subprocess.Popen(
            [*args, "--log-level", "warn"], env=env, stderr=err, cwd=config.parent
        )
    try:
        wait_until_listening(CLIENT_PORT, proc, lambda: f"see {log}")
        yield proc
    finally:
        end_process(proc)


def end_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- what runs during a scenario ------------------------------------------------------


@attrs.define
class Probes:
    latencies: list[float] = attrs.field(factory=list)
    failures: list[str] = attrs.field(factory=list)
    answered_at: list[float] = attrs.field(factory=list)


def probe(stop: threading.Event, out: Probes) -> None:
    while not stop.wait(PROBE_EVERY):
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", CLIENT_PORT), PROBE_DEADLINE) as s:
                s.settimeout(max(0.01, PROBE_DEADLINE - (time.monotonic() - t0)))
                answer = amp_call(s, b"Status")
            if b"_answer" not in answer:
                raise ConnectionError(answer.get(b"_error_code", b"?").decode())
            out.latencies.append(time.monotonic() - t0)
            out.answered_at.append(time.monotonic())
        except (OSError, ConnectionError) as e:
            out.failures.append(type(e).__name__)


def sample_rss(stop: threading.Event, pid: int, out: list[float]) -> None:
    while not stop.wait(0.2):
        out.append(rss_mb(pid))


def run_with(
    pid: int, seconds: float, abuse: Callable[[threading.Event], None]
) -> tuple[Probes, list[float]]:
    stop = threading.Event()
    probes, rss = Probes(), [rss_mb(pid)]
    threads = [
        threading.Thread(target=probe, args=(stop, probes), daemon=True),
        threading.Thread(target=sample_rss, args=(stop, pid, rss), daemon=True),
        threading.Thread(target=abuse, args=(stop,), daemon=True),
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    probes.answered_at = [t - start for t in probes.answered_at]
    return probes, rss


def flood(tree: Path, work: Path, seconds: float, flood_mb: float) -> dict[str, object]:
    config = work / "flood.toml"
    cluster_file(config, 1)
    with node_process(tree, config, work / "flood-node.log") as proc:
        with socket.create_connection(("127.0.0.1", CLIENT_PORT), 10) as s:
            for i in range(200):
                amp_call(s, b"Submit", body=b"%03d " % i + b"x" * 30_000)
        request = amp_box(_command=b"ListMessages", _ask=b"1", start=b"0", limit=b"2")
        count = int(flood_mb * 1e6 / len(request))
        sent = [0]

        def abuse(stop: threading.Event) -> None:
            s = socket.create_connection(("127.0.0.1", CLIENT_PORT), 10)
            s.setblocking(False)
            data = request * count
            while data and not stop.is_set():
                try:
                    n = s.send(data[:65536])
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                except OSError:
                    break
                sent[0] += n
                data = data[n:]
            stop.wait()
            s.close()

        time.sleep(1)
        probes, rss = run_with(proc.pid, seconds, abuse)
    return report(probes, rss) | {"requests_sent": sent[0] // len(request)}


def fake_neighbour(stop: threading.Event, drops: list[float]) -> None:
    """Node 2: handshake, a ping every 2 s, never a read; back as soon as dropped."""
    hello = codec.encode(codec.Hello(codec.PROTOCOL_VERSION, CLUSTER, 2, 4242))
    ping = codec.encode(codec.Ping())
    while not stop.is_set():
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(2)
            s.connect(("127.0.0.1", PEER_PORT))
            s.sendall(struct.pack("!I", len(hello)) + hello)
            while not stop.wait(2):
                # Dropped by the node: this send fails (its abort resets the connection).
                s.sendall(struct.pack("!I", len(ping)) + ping)
        except OSError:
            drops.append(time.monotonic())
            stop.wait(0.5)
        finally:
            s.close()


def stall(tree: Path, work: Path, seconds: float) -> dict[str, object]:
    config = work / "stall.toml"
    cluster_file(config, 2)
    drops: list[float] = []
    submits = {"answered": 0, "busy": 0, "timed_out": 0, "other": 0}
    took: list[float] = []

    def abuse(stop: threading.Event) -> None:
        neighbour = threading.Thread(target=fake_neighbour, args=(stop, drops), daemon=True)
        neighbour.start()
        time.sleep(1)
        i = 0
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", CLIENT_PORT), 5) as s:
                    s.settimeout(5)
                    while not stop.is_set():
                        i += 1
                        t0 = time.monotonic()
                        answer = amp_call(s, b"Submit", body=b"%08d " % i + b"s" * 16_000)
                        if b"_answer" in answer:
                            submits["answered"] += 1
                            took.append(time.monotonic() - t0)
                        elif answer.get(b"_error_code") == b"BUSY":
                            submits["busy"] += 1
                            stop.wait(0.1)
                        else:
                            submits["other"] += 1
            except TimeoutError:
                submits["timed_out"] += 1
            except (OSError, ConnectionError):
                submits["other"] += 1
                stop.wait(0.1)
        neighbour.join(10)

    log = work / "stall-node.log"
    with node_process(tree, config, log) as proc:
        probes, rss = run_with(proc.pid, seconds, abuse)
    took.sort()
    reasons: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if "closing link to" in line:
            why = line.split(": ", 2)[-1][:60]
            reasons[why] = reasons.get(why, 0) + 1
    return report(probes, rss) | {
        "submits": submits,
        "submit_ms_p50": round(took[len(took) // 2] * 1000, 1) if took else None,
        "submit_ms_max": round(took[-1] * 1000, 1) if took else None,
        "stored_mb": round(submits["answered"] * 16_000 / 1e6, 1),
        "link_drops": reasons,
    }


def report(probes: Probes, rss: list[float]) -> dict[str, object]:
    lat = sorted(probes.latencies)
    gaps = [b - a for a, b in zip(probes.answered_at, probes.answered_at[1:], strict=False)]
    return {
        "rss_mb_before": round(rss[0], 1),
        "rss_mb_peak": round(max(rss), 1),
        "probes": len(lat) + len(probes.failures),
        "unanswered": len(probes.failures),
        "latency_ms_p50": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "latency_ms_max": round(lat[-1] * 1000, 1) if lat else None,
        "longest_without_answer_s": round(max(gaps, default=0.0), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gossip.bench.client_abuse", description=__doc__)
    p.add_argument("--tree", type=Path, default=HERE, help="source tree the node runs from")
    p.add_argument("--scenario", default="flood,stall", help="flood, stall or both")
    p.add_argument("--seconds", type=float, default=40.0, help="length of each scenario")
    p.add_argument("--flood-mb", type=float, default=1.0, help="pipelined requests sent")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="client-abuse-") as tmp:
        work = Path(tmp)
        for name in args.scenario.split(","):
            if name == "flood":
                figures = flood(args.tree, work, args.seconds, args.flood_mb)
            elif name == "stall":
                figures = stall(args.tree, work, args.seconds)
            else:
                p.error(f"unknown scenario {name!r}")
            print(f"{name} ({args.tree}): {figures}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
