"""Control-plane benchmark of the nftables mode, side by side with the iptables mode.

Not a test: it measures and writes figures. Two parts, each on virtual nodes or in network
namespaces this module creates (never the host's):

* `series(sizes)`: the renderer and libnftables alone, Services x 10 endpoints from 1k to
  50k: cold full render, the transaction's apply, and a one-endpoint partial (render +
  apply), each size in a fresh namespace. Shows whether sync cost grows linearly.
* `daemons(n, rounds)`: the real daemon in each mode, alternating within a round, on the
  same preload of the list/watch test API server (bench/control_plane.py's
  `daemon_start`): daemon start → all Services programmed, the first full sync's own
  duration (from its "synced … in Xs" log line), one endpoint change → applied (watch
  event to partial sync), RSS and peak RSS.

`measure()` runs both and returns the figures; the command line also writes
bench/results/nft_control_plane.json and .png:

    sudo .venv/bin/python -m kube_proxy_py_bench.nft_control_plane    # 1k..50k, daemons at 10k
    sudo .venv/bin/python -m kube_proxy_py_bench.nft_control_plane --sizes 1000 --daemon-size 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from . import control_plane

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EPS = control_plane.EPS_PER_SVC
DEFAULT_SIZES = (1000, 5000, 10000, 20000, 50000)
SYNCED = re.compile(r"synced \d+ services \(full, \d+ changed\) in ([\d.]+)s")


# -- inner: runs inside a fresh network namespace -----------------------------------------


def inner(n: int, repeat: int) -> dict:
    """Render and apply n Services (cold), then `repeat` one-endpoint partial syncs."""
    from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
    from proxy.nftables.nft import LibNftables
    from proxy.nftables.render import NftConfig, render

    store = Store()
    svcs, slices = control_plane.objects(n, EPS)
    store.replace(SERVICE, svcs)
    store.replace(ENDPOINT_SLICE, slices)
    model = store.snapshot().model
    cfg = NftConfig(family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",))
    nft = LibNftables()

    def apply(text: str) -> float:
        t0 = time.perf_counter()
        res = nft.run(text)
        if res.rc != 0:
            raise SystemExit(f"nft failed: {res.err[:800]}")
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    full = render(model, cfg)
    render_s = time.perf_counter() - t0
    apply_s = apply(full.text)
    state = full.state
    p_render, p_apply = [], []
    for g in range(repeat):
        store.upsert(ENDPOINT_SLICE, control_plane.changed_slice(n // 2, EPS, g + 1))
        snap = store.snapshot()
        t0 = time.perf_counter()
        res = render(snap.model, cfg, changed=snap.changed, previous=state)
        p_render.append(time.perf_counter() - t0)
        p_apply.append(apply(res.text))
        state = res.state
    med = statistics.median
    return {
        "services": n,
        "endpoints": n * EPS,
        "elements": full.elements,
        "chains": full.chains,
        "text_mb": len(full.text) / 1e6,
        "full_render_s": render_s,
        "full_apply_s": apply_s,
        "partial_render_s": med(p_render),
        "partial_apply_s": med(p_apply),
        "partial_elements_written": res.elements_written,
    }


# -- outer --------------------------------------------------------------------------------


def _netns() -> str:
    ns = f"kpb-nftcp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    return ns


def _drop(ns: str) -> None:
    subprocess.run(["ip", "netns", "del", ns], check=False)


def series(sizes=DEFAULT_SIZES, repeat: int = 3) -> list[dict]:
    """Renderer + libnftables figures per size, each in a fresh namespace."""
    out = []
    for n in sizes:
        ns = _netns()
        try:
            argv = [
                sys.executable,
                "-m",
                "kube_proxy_py_bench.nft_control_plane",
                "--inner",
                str(n),
            ]
            p = subprocess.run(
                ["ip", "netns", "exec", ns, *argv, "--repeat", str(repeat)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=3600,
            )
        finally:
            _drop(ns)
        if p.returncode != 0:
            raise SystemExit(f"inner benchmark failed at {n}:\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        out.append(row)
        print(
            f"{n:>6} services: {row['elements']} elements, {row['chains']} chains | full: "
            f"render {row['full_render_s']:.3f}s + apply {row['full_apply_s']:.3f}s | "
            f"1-endpoint partial: render {row['partial_render_s'] * 1e3:.1f} ms + apply "
            f"{row['partial_apply_s'] * 1e3:.1f} ms",
            flush=True,
        )
    return out


def daemons(n: int = 10000, rounds: int = 1, modes=("iptables", "nftables")) -> dict:
    """The daemon in both modes on the same preload, alternating; medians per mode."""
    from .core import alternate

    work = Path(f"/tmp/kpb-nftcp-{uuid.uuid4().hex[:6]}")
    work.mkdir()
    objs = control_plane.objects(n, EPS)
    by_mode = {c.mode: c for c in control_plane.contenders("nft")}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r, mode in alternate(list(runs), rounds):
        # A loaded machine can take minutes for iptables-nft at 10k: wait long.
        d = control_plane.daemon_start(
            by_mode[mode], objs, n, EPS, r + 1, work, sync_timeout=120 + n * 0.2
        )
        d.pop("ruleset")
        logs = "".join(p.read_text() for p in (work / f"{mode}-{n}-{r + 1}").glob("proxy-*.log"))
        m = SYNCED.search(logs)
        d["full_sync_s"] = float(m.group(1)) if m else float("nan")
        runs[mode].append(d)
        print(
            f"{n:>6} services, {mode:<8} daemon: start → programmed {d['sync_s']:.2f}s (its full "
            f"sync {d['full_sync_s']:.2f}s), endpoint change → applied "
            f"{d['partial_s'] * 1e3:.0f} ms, RSS {d['rss_mib']:.0f} MiB "
            f"(peak {d['peak_rss_mib']:.0f} MiB)",
            flush=True,
        )
    med = statistics.median
    keys = ("sync_s", "full_sync_s", "partial_s", "rss_mib", "peak_rss_mib")
    summary: dict = {mode: {k: med(x[k] for x in rs) for k in keys} for mode, rs in runs.items()}
    if len(runs) == 2:
        ipt, nft = summary["iptables"], summary["nftables"]
        summary["ratios"] = {
            "start_to_programmed": nft["sync_s"] / ipt["sync_s"],
            "full_sync": nft["full_sync_s"] / ipt["full_sync_s"],
            "event_to_programmed": nft["partial_s"] / ipt["partial_s"],
        }
    return {"services": n, "rounds": runs, "median": summary}


def measure(
    sizes=DEFAULT_SIZES,
    daemon_size: int = 10000,
    rounds: int = 1,
    modes=("iptables", "nftables"),
) -> dict:
    """Both parts; the figures as a dict (see the module docstring)."""
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cores": os.cpu_count(),
        "series": series(sizes) if sizes else [],
        "daemons": daemons(daemon_size, rounds, modes) if daemon_size else None,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    rows = res["series"]
    x = [r["services"] / 1000 for r in rows]
    ax[0].plot(x, [r["full_render_s"] for r in rows], "o-", label="render")
    ax[0].plot(x, [r["full_apply_s"] for r in rows], "s-", label="libnftables apply")
    ax[0].plot(x, [r["full_render_s"] + r["full_apply_s"] for r in rows], "^-", label="full sync")
    ax[0].set_xlabel("thousand Services (x 10 endpoints)")
    ax[0].set_ylabel("seconds")
    ax[0].set_title("nftables full sync vs size (linear axes)")
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    d = res.get("daemons")
    if d:
        med = d["median"]
        modes = ["iptables", "nftables"]
        w = 0.38
        ax[1].bar([0 - w / 2], [med["iptables"]["full_sync_s"]], w, label="iptables")
        ax[1].bar([0 + w / 2], [med["nftables"]["full_sync_s"]], w, label="nftables")
        ax[1].bar([1 - w / 2], [med["iptables"]["partial_s"]], w, color="C0")
        ax[1].bar([1 + w / 2], [med["nftables"]["partial_s"]], w, color="C1")
        ax[1].set_xticks([0, 1], ["full sync", "watch event → programmed"])
        ax[1].set_yscale("log")
        ax[1].set_ylabel("seconds (log)")
        ax[1].set_title(f"daemon, {d['services'] // 1000}k Services: {' vs '.join(modes)}")
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--daemon-size", type=int, default=10000, help="0: skip the daemons")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--modes", default="iptables,nftables", help="daemons to compare")
    ap.add_argument("--out", type=Path, default=RESULTS / "nft_control_plane.json")
    ap.add_argument("--repeat", type=int, default=3, help="partial syncs per size (series)")
    ap.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        print(json.dumps(inner(a.inner, a.repeat)))
        return 0
    if os.geteuid() != 0:
        print("nft_control_plane: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in a.sizes.split(",") if s]
    res = measure(sizes, a.daemon_size, a.rounds, tuple(a.modes.split(",")))
    if res["daemons"] and "ratios" in res["daemons"]["median"]:
        r = res["daemons"]["median"]["ratios"]
        print(
            f"nftables / iptables: start → programmed {r['start_to_programmed']:.3f}, full "
            f"sync {r['full_sync']:.3f}, watch event → programmed {r['event_to_programmed']:.3f}"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    if res["series"] and res["daemons"] and "ratios" in res["daemons"]["median"]:
        plot(res, a.out.with_suffix(".png"))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
