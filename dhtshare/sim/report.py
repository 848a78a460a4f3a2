"""Simulation results for people: a summary table, one JSON document, optional plots."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from dhtshare.errors import DhtshareError
from dhtshare.text import format_size, plural, table

__all__ = ["latency_summary", "render_summary", "write_plot"]


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(
    seconds: Sequence[float], rpcs: Sequence[int], found: int, count: int
) -> dict[str, Any]:
    """The ``lookups`` block of the summary from raw measurements."""
    return {
        "count": count,
        "success_rate": round(found / count, 4) if count else 0.0,
        "p50_ms": round(_pct(seconds, 0.5) * 1000, 1),
        "p95_ms": round(_pct(seconds, 0.95) * 1000, 1),
        "rpcs_per_lookup": statistics.median(rpcs) if rpcs else 0,
    }


def render_summary(doc: dict[str, Any]) -> str:
    """The end-of-run report as aligned tables."""
    parts: list[str] = [
        f"scenario {doc['scenario']['name']}: {doc['nodes']} nodes,"
        f" seed {doc['scenario']['seed']}, "
        f"started in {doc['startup_s']:.1f} s, peak RSS {doc['peak_rss_mb']:.0f} MB"
    ]
    lookups = doc["lookups"]
    rows: list[tuple[Any, ...]] = [
        (
            f"{int(100 * lv.get('churn', 0))}%",
            lv["count"],
            f"{100 * lv['success_rate']:.1f}%",
            lv["p50_ms"],
            lv["p95_ms"],
            lv["rpcs_per_lookup"],
        )
        for lv in lookups.get("by_churn", [lookups])
    ]
    parts.append(table(rows, ["CHURN", "LOOKUPS", "FOUND", "P50 MS", "P95 MS", "RPCS"]))
    if doc.get("downloads"):
        rows = [
            (
                d["name"],
                "yes" if d["verified"] else "NO",
                f"{d['seconds']:.2f}",
                f"{d['mb_s']:.1f}",
                len(d["sources"]),
            )
            for d in doc["downloads"]
        ]
        parts.append(table(rows, ["DOWNLOAD", "VERIFIED", "SECONDS", "MB/S", "SOURCES"]))
        uploads = doc.get("uploaders") or doc["seeders"]
        total = sum(uploads.values()) or 1
        size = doc["scenario"]["size"] or 1
        ordered = sorted(uploads.items(), key=lambda kv: -kv[1])
        rows = [
            (name, format_size(n), f"{100 * n / total:.0f}%", f"{n / size:.2f}x")
            for name, n in ordered
        ]
        parts.append(table(rows, ["UPLOADER", "BYTES", "SHARE", "FILE SIZES"]))
    events = [f"  t={e['t']:6.2f}s  {e['event']}" for e in doc.get("churn_events", [])]
    if events:
        parts.append("events:\n" + "\n".join(events))
    if not doc["ok"]:
        result = "FAILED"
    elif doc.get("downloads"):
        result = f"OK, every download verified ({plural(len(doc['downloads']), 'download')})"
    else:
        worst = min(lv["success_rate"] for lv in lookups.get("by_churn") or [lookups])
        result = f"OK, DHT only (no downloads): the worst churn level found {worst:.1%}"
    parts.append(f"result: {result}")
    return "\n\n".join(parts)


def write_plot(doc: dict[str, Any], path: str) -> None:
    """Throughput over time per download and a lookup-latency CDF, as one PNG."""
    try:  # imported here: matplotlib is an optional extra, and slow to import
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DhtshareError("plotting needs matplotlib", "pip install 'dhtshare[plot]'") from exc
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, series in doc.get("timeline", {}).items():
        times = [t for t, _ in series]
        rates = [0.0] + [
            (b2 - b1) / max(t2 - t1, 1e-6) / 1e6 for (t1, b1), (t2, b2) in pairwise(series)
        ]
        left.plot(times, rates, label=name)
    for event in doc.get("churn_events", []):
        left.axvline(event["t"], color="grey", linestyle=":")
    left.set(title="download throughput", xlabel="seconds", ylabel="MB/s")
    if doc.get("timeline"):
        left.legend()
    samples = sorted(doc.get("lookup_samples_ms", []))
    if samples:
        right.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))])
    right.set(
        title="DHT lookup latency CDF", xlabel="ms", ylabel="fraction of lookups", xscale="log"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
