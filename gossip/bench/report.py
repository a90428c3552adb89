"""The output of ``gossip-bench``: the table, the JSON file and the plots.

The table has one row per figure and one column per run (each variant's
rounds side by side); with several variants, a last column per extra variant
gives the ratio of its mean over the rounds to the first variant's mean.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# (figure key, label). Workload rows first, then the rows every run has.
WORKLOAD_ROWS: dict[str, list[tuple[str, str]]] = {
    "latency": [
        ("latency_p50_ms", "p50 to last node (ms)"),
        ("latency_p99_ms", "p99 to last node (ms)"),
        ("latency_max_ms", "max to last node (ms)"),
        ("stamped_p50_ms", "  p50 by node clocks (ms)"),
        ("stamped_p99_ms", "  p99 by node clocks (ms)"),
        ("stamped_max_ms", "  max by node clocks (ms)"),
        ("undelivered_pairs", "never delivered (node-msg pairs)"),
        ("submit_errors", "failed submits"),
    ],
    "throughput": [
        ("delivered_per_second", "delivered to all (msg/s)"),
        ("submitted_per_second", "acknowledged submits (msg/s)"),
        ("messages", "messages submitted"),
        ("drain_seconds", "drain after last ack (s)"),
        ("undelivered_pairs", "lost (node-msg pairs)"),
        ("submit_errors", "failed submits"),
        ("latency_p50_ms", "p50 to last node (ms)"),
        ("latency_p99_ms", "p99 to last node (ms)"),
        ("pushes_per_message", "Watch pushes / msg (all nodes)"),
        ("bench_cpu_share", "bench process CPU (cores busy)"),
    ],
    "resync": [
        ("catchup_seconds", "catch-up from restart (s)"),
        ("catchup_from_up_seconds", "catch-up from first answer (s)"),
        ("payload_bytes_ratio", "payload bytes in / missed bytes"),
        ("payload_frames_ratio", "payload frames in / missed msgs"),
        ("payload_messages_ratio", "payload msgs in / missed msgs"),
        ("undelivered_pairs", "never delivered (node-msg pairs)"),
        ("submit_errors", "failed submits"),
    ],
}
WORKLOAD_ROWS["wan"] = WORKLOAD_ROWS["latency"]  # the latency workload with slow links
COMMON_ROWS: list[tuple[str, str]] = [
    ("payload_frames_per_message", "payload frames / broadcast"),
    ("payload_messages_per_message", "payload msgs sent / broadcast"),
    ("control_frames_per_message", "control frames / broadcast"),
    ("wire_bytes_per_message", "frame bytes sent / broadcast"),
    ("cpu_seconds_per_1000", "node CPU s / 1000 msgs"),
    ("cpu_us_per_message_per_node", "node CPU us / msg / node"),
    ("cpu_seconds_per_1000_net", "  same, net of idle work (est)"),
    ("fsyncs_per_1000", "fsyncs / 1000 msgs (all nodes)"),
    ("rss_peak_max_mb", "peak RSS per node, max (MB)"),
    ("rss_peak_mean_mb", "peak RSS per node, mean (MB)"),
    ("bench_cpu_seconds", "bench process CPU (s)"),
]
LABEL_WIDTH = 34
COLUMN_WIDTH = 12


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.1f}"
        if a >= 1 or a == 0:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return sum(nums) / len(nums) if nums else None


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None:
        return None
    if reference == 0:
        return 1.0 if value == 0 else None
    return value / reference


def summarize(result: Mapping[str, Any]) -> dict[str, Any]:
    """workload -> figure -> {strategy: {values, mean}, ratio: {strategy: mean / first's}}."""
    strategies: Sequence[str] = result["settings"]["strategies"]
    out: dict[str, Any] = {}
    for workload in result["settings"]["workloads"]:
        runs = [r for r in result["runs"] if r["workload"] == workload]
        figures: dict[str, Any] = {}
        for key, _label in WORKLOAD_ROWS[workload] + COMMON_ROWS:
            entry: dict[str, Any] = {}
            for s in strategies:
                values = [
                    r["figures"].get(key)
                    for r in sorted(runs, key=lambda r: r["round"])
                    if r["strategy"] == s
                ]
                entry[s] = {"values": values, "mean": _mean(values)}
            first = entry[strategies[0]]["mean"]
            entry["ratio"] = {s: ratio(entry[s]["mean"], first) for s in strategies[1:]}
            figures[key] = entry
        out[workload] = figures
    return out


def headline(run: Mapping[str, Any]) -> str:
    """One progress line about a finished run."""
    f = run["figures"]
    w = run["workload"]
    if w in ("latency", "wan"):
        main = (
            f"p50 {fmt(f['latency_p50_ms'])} ms, p99 {fmt(f['latency_p99_ms'])} ms,"
            f" max {fmt(f['latency_max_ms'])} ms"
        )
    elif w == "throughput":
        main = (
            f"{fmt(f['delivered_per_second'])} msg/s delivered of {fmt(f['messages'])},"
            f" drain {fmt(f['drain_seconds'])} s"
        )
    else:
        main = (
            f"caught up in {fmt(f['catchup_seconds'])} s,"
            f" bytes ratio {fmt(f['payload_bytes_ratio'])}"
        )
    return f"{main}; undelivered {f['undelivered_pairs']}, failed submits {f['submit_errors']}"


def format_table(result: Mapping[str, Any]) -> str:
    settings = result["settings"]
    strategies: Sequence[str] = settings["strategies"]
    rounds: int = settings["rounds"]
    m = result["machine"]
    summary = summarize(result)
    columns = [(s, r) for s in strategies for r in range(1, rounds + 1)]
    heads = [f"{s} r{r}" for s, r in columns] + [f"{s}/{strategies[0]}" for s in strategies[1:]]
    width = max([COLUMN_WIDTH, *(len(h) + 2 for h in heads)])
    lines = [
        f"gossip-bench: {settings['topology']}; fsync {settings['fsync_policy']};"
        f" {settings['body_bytes']}-byte bodies; seed {settings['seed']}",
        f"machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['platform']};"
        f" load {_load(m.get('load_average'))} at start, {_load(m.get('load_average_end'))}"
        f" at end; commit {result['commit']}",
        "delivery = the time the bench receives the last node's push (Watch) of the id; a"
        " node pushes an id once the message is durable under its fsync policy;"
        " 'by node clocks' = max over nodes of the stored message's received_at (same clock;"
        " stamped on arrival, before the fsync)",
        f"workloads: latency {settings['latency_messages']} msgs every"
        f" {settings['latency_interval'] * 1000:g} ms; throughput {settings['clients']} clients"
        f" x {settings.get('window', 1)} calls of {settings.get('batch', 1)} msgs in flight"
        f" for {settings['throughput_seconds']:g} s;"
        f" resync {settings['resync_messages']:,} msgs;"
        f" wan +{settings['wan_delay_ms']:g} ms per link; {rounds} round(s),"
        " variants alternating",
        *_busy_warning(m),
        "",
        f"{'figure':<{LABEL_WIDTH}}" + "".join(f"{h:>{width}}" for h in heads),
    ]
    for workload in settings["workloads"]:
        rule = "-" * (LABEL_WIDTH + width * len(heads) - 4 - len(workload))
        lines.append(f"-- {workload} {rule}")
        for key, label in WORKLOAD_ROWS[workload] + COMMON_ROWS:
            entry = summary[workload][key]
            cells = []
            for s, r in columns:
                values = entry[s]["values"]
                cells.append(fmt(values[r - 1]) if r - 1 < len(values) else "-")
            for s in strategies[1:]:
                rat = entry["ratio"][s]
                cells.append("-" if rat is None else f"{rat:.2f}")
            lines.append(f"{label:<{LABEL_WIDTH}}" + "".join(f"{c:>{width}}" for c in cells))
    lines += [
        "",
        "per broadcast = summed over all nodes' sent peer frames (traffic counters; handshakes"
        " and pings not counted) / messages submitted; node CPU = utime+stime of every node"
        " process during the workload ('net' subtracts the nodes' CPU rate measured for 1 s while"
        " idle); peak RSS ="
        " VmHWM over the process's life.",
    ]
    return "\n".join(lines)


def _busy_warning(m: Mapping[str, Any]) -> list[str]:
    cores = m.get("cores") or 1
    loads = [v[0] for v in (m.get("load_average"), m.get("load_average_end")) if v]
    if loads and max(loads) > cores:
        return [
            f"WARNING: 1-minute load average reached {max(loads):.1f} on {cores} cores:"
            " other work competed with the nodes; compare figures only within this run"
        ]
    return []


def _load(values: Sequence[float] | None) -> str:
    return "-" if not values else "/".join(f"{v:.2f}" for v in values)


def write_json(result: Mapping[str, Any], path: Path) -> None:
    doc = {**result, "summary": summarize(result)}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot_unavailable() -> str | None:
    """Why --plot cannot work here, or None."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install 'gossip[bench]')"
    return None


def write_plot(result: Mapping[str, Any], path: Path) -> None:
    """One figure: a latency distribution (CDF) panel per workload that has latencies
    (latency, wan, throughput) and, for throughput runs, throughput over time."""
    # Imported here: matplotlib is an optional extra (gossip[bench]).
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    runs = result["runs"]
    workloads = [
        w
        for w in result["settings"]["workloads"]
        if any(r["workload"] == w and r.get("latencies_ms") for r in runs)
    ]
    timelines = [r for r in runs if r.get("timeline")]
    panels = len(workloads) + (1 if timelines else 0)
    if not panels:
        raise ValueError("no latency, wan or throughput runs to plot")
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=False):
        _latency_panel(ax, result, workload)
    if timelines:
        _throughput_panel(axes[0][-1], timelines)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency_panel(ax: Any, result: Mapping[str, Any], workload: str) -> None:
    for run in result["runs"]:
        if run["workload"] != workload:
            continue
        lat = run.get("latencies_ms") or []
        if not lat:
            continue
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        line = ax.step(lat, ys, where="post", label=f"{run['strategy']} r{run['round']} durable")
        stamped = run.get("stamped_latencies_ms") or []
        if stamped:
            ys = [(i + 1) / len(stamped) for i in range(len(stamped))]
            ax.step(
                stamped,
                ys,
                where="post",
                linestyle="--",
                color=line[0].get_color(),
                label=f"{run['strategy']} r{run['round']} node clocks",
            )
    ax.set_title(f"{workload}: submit to last of {result['settings']['nodes']} nodes")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of messages")
    ax.grid(True, alpha=0.3)
    ax.legend()


def _throughput_panel(ax: Any, runs: Sequence[Mapping[str, Any]]) -> None:
    for run in runs:
        t = run["timeline"]
        width = t["bin_seconds"]
        delivered = t["delivered_per_second"]
        xs = [i * width for i in range(len(delivered))]
        line = ax.step(
            xs, delivered, where="post", label=f"{run['strategy']} r{run['round']} delivered to all"
        )
        acked = t["acknowledged_per_second"]
        ax.step(
            [i * width for i in range(len(acked))],
            acked,
            where="post",
            linestyle="--",
            color=line[0].get_color(),
            label=f"{run['strategy']} r{run['round']} acknowledged",
        )
    ax.set_title("throughput over time")
    ax.set_xlabel(f"s since the first submit ({runs[0]['timeline']['bin_seconds']:g} s bins)")
    ax.set_ylabel("messages / s")
    ax.grid(True, alpha=0.3)
    ax.legend()
