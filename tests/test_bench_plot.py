"""``gossip-bench --plot``: latency distributions and throughput over time, from a result.

The result is built by hand (no cluster): what the plot draws is checked on the
figure matplotlib made, and the throughput timeline's binning on its own.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from gossip.bench import report
from gossip.bench.cluster import TIMELINE_BIN_SECONDS, quantiles_ms, timeline


def result() -> dict[str, Any]:
    lat = [float(i) for i in range(1, 101)]
    return {
        "settings": {"workloads": ["latency", "throughput", "resync"], "nodes": 16},
        "runs": [
            {
                "workload": "latency",
                "strategy": "plumtree",
                "round": 1,
                "latencies_ms": lat,
                "stamped_latencies_ms": lat,
            },
            {
                "workload": "throughput",
                "strategy": "plumtree",
                "round": 1,
                "latencies_ms": lat,
                "timeline": timeline(0.0, [0.1, 0.2, 0.7], [0.3, 0.8, 1.2]),
            },
            {"workload": "resync", "strategy": "plumtree", "round": 1},
        ],
    }


def test_plot_has_a_latency_panel_per_workload_and_a_throughput_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latency and throughput runs each get a latency CDF panel; throughput runs also
    get a throughput-over-time panel; resync (no latencies) gets none."""
    plt = importlib.import_module("matplotlib.pyplot")  # the bench extra, in dev
    made: list[Any] = []
    savefig = plt.Figure.savefig

    def keep(fig: Any, *args: Any, **kwargs: Any) -> None:
        made.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    out = tmp_path / "bench.png"
    report.write_plot(result(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [ax.get_title() for ax in made[0].axes]
    assert titles == [
        "latency: submit to last of 16 nodes",
        "throughput: submit to last of 16 nodes",
        "throughput over time",
    ]
    over_time = made[0].axes[2]
    assert over_time.get_ylabel() == "messages / s"
    assert len(over_time.get_lines()) == 2  # delivered and acknowledged


def test_plot_without_latencies_is_an_error(tmp_path: Path) -> None:
    """A result with nothing to draw is a ValueError (gossip-bench prints one line)."""
    doc = result()
    doc["runs"] = doc["runs"][2:]
    with pytest.raises(ValueError, match="no latency"):
        report.write_plot(doc, tmp_path / "x.png")


def test_timeline_counts_per_bin_as_rates() -> None:
    """Each bin holds the events since start in it, divided by the bin's length."""
    t = timeline(10.0, [10.1, 10.2, 10.7], [10.3, 10.8, 11.2])
    per = 1 / TIMELINE_BIN_SECONDS
    assert t["acknowledged_per_second"] == [2 * per, 1 * per, 0.0]
    assert t["delivered_per_second"] == [1 * per, 1 * per, 1 * per]


def test_quantiles_keep_the_extremes_and_bound_the_count() -> None:
    """At most ``points`` values, sorted, first and last the minimum and maximum."""
    values = [i / 1000 for i in range(10_000, 0, -1)]
    q = quantiles_ms(values, 100)
    assert len(q) == 100 and q == sorted(q)
    assert q[0] == pytest.approx(1.0) and q[-1] == pytest.approx(10_000.0)
    assert quantiles_ms([0.002, 0.001], 100) == [1.0, 2.0]
