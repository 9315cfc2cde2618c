"""PNG plots of a run: throughput against streams, sync time and memory against Services,
DNS latency percentiles. Each returns the file it wrote (or None with nothing to plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .core import SuiteResult


def data_plane(res: SuiteResult, out: Path) -> Path | None:
    curves = res.extra.get("throughput_vs_streams") or {}
    cps = next((f for f in res.figures if f.name == "new connections/s"), None)
    if not curves:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, pts in curves.items():
        xs = sorted(int(k) for k in pts if pts[k] is not None)
        if xs:
            ax1.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("parallel streams (iperf3)")
    ax1.set_ylabel("Gbit/s")
    ax1.set_title("throughput against streams")
    if ax1.lines:  # --figures without throughput: no curves
        ax1.legend(fontsize=8)
    if cps is not None:
        names = [c for c in cps.samples if cps.value(c) is not None]
        vals = [cps.value(c) or 0 for c in names]
        bars = ax2.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        for b, v in zip(bars, vals, strict=True):
            ax2.annotate(
                f"{v:,.0f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax2.set_title("new connections/s (a request per connection)")
        ax2.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path = out / "data-plane.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def control_plane(res: SuiteResult, out: Path) -> Path | None:
    series: dict[str, dict[str, list[tuple[int, float]]]] = {"sync": {}, "mem": {}}
    for f in res.figures:
        if f.services is None:
            continue
        kind = "sync" if f.name.startswith("full sync") else None
        kind = kind or ("mem" if "RSS" in f.name else None)
        if kind is None:
            continue
        for c in f.samples:
            v = f.value(c)
            if v is None:
                continue
            label = c if kind == "sync" else f"{c}, {'peak' if 'peak' in f.name else 'after'}"
            series[kind].setdefault(label, []).append((f.services, v))
    if not series["sync"]:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, ylabel, title in (
        (ax1, "sync", "seconds", "full sync (start → all programmed) against Services"),
        (ax2, "mem", "MiB", "daemon memory against Services"),
    ):
        for label, pts in series[kind].items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("Services (× endpoints per Service)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax2.axhline(200, color="red", lw=0.8, ls="--", label="200 MiB target (10k)")
    fig.tight_layout()
    path = out / "control-plane.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def dns(res: SuiteResult, out: Path) -> Path | None:
    pct: dict[str, dict[str, dict[str, float]]] = res.extra.get("percentiles_ms") or {}
    if not pct:
        return None
    fig, axes = plt.subplots(1, len(pct), figsize=(6 * len(pct), 4.5), squeeze=False)
    rates: dict[str, Any] = res.extra.get("half_rate_qps", {})
    for ax, (s, servers) in zip(axes[0], pct.items(), strict=True):
        for name, ps in servers.items():
            qs = sorted(ps, key=float)
            ax.plot([f"p{q}" for q in qs], [ps[q] for q in qs], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{s} queries at {rates.get(s, '?')} q/s (half our maximum)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "dns.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bars(name: str) -> Any:
    """A bar chart per figure of a suite (contenders side by side)."""

    def plot(res: SuiteResult, out: Path) -> Path | None:
        figs = [f for f in res.figures if any(f.value(c) is not None for c in f.samples)]
        if not figs:
            return None
        cols = min(4, len(figs))
        rows = -(-len(figs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4 * rows), squeeze=False)
        for ax in axes.flat[len(figs) :]:
            ax.axis("off")
        for ax, f in zip(axes.flat, figs, strict=False):
            names = [c for c in f.samples if f.value(c) is not None]
            vals = [f.value(c) or 0 for c in names]
            drawn = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
            for b, v in zip(drawn, vals, strict=True):
                ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)  # fmt: skip
            ax.set_title(f"{f.name}\n({f.unit}, {f.better} is better)", fontsize=9)
            ax.tick_params(axis="x", rotation=20, labelsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    return plot


PLOTS = {
    "data-plane": data_plane,
    "control-plane": control_plane,
    "dns": dns,
    "portforward": bars("portforward"),
    "client-address": bars("client-address"),
}
