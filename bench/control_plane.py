"""Control-plane benchmark of the iptables mode (not a test: it measures and writes figures).

For 1k and 10k Services with 10 endpoints each, side by side in one run:
  * full sync split into rendering (pure Python) and iptables-restore's own time;
  * a single endpoint change: partial render + restore;
  * through the real daemon and a list/watch API server: time from the watch event
    (an EndpointSlice update) to rules applied, and the daemon's resident memory.
Targets (issue #2): render <= 0.5x restore; one-endpoint change at 10k < 0.2x full
sync; RSS at 10k Services / 100k endpoints < 300 MB.

Everything runs inside network namespaces this script creates (never the host's):
    sudo .venv/bin/python bench/control_plane.py            # 1k and 10k
    sudo .venv/bin/python bench/control_plane.py --sizes 1000 --repeat 3
Writes bench/results/control_plane.json and bench/results/control_plane.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
EPS_PER_SVC = 10


# -- objects ------------------------------------------------------------------------------


def _service(i: int) -> dict:
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": f"svc-{i}", "namespace": "bench"},
        "spec": {
            "clusterIP": f"198.19.{i // 256}.{i % 256}",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def _slice(i: int, eps: int) -> dict:
    endpoints = []
    for j in range(eps):
        k = i * eps + j
        endpoints.append(
            {
                "addresses": [f"198.18.{(k // 256) % 256}.{k % 256}"],
                "conditions": {"ready": True},
                "nodeName": "node-a",
            }
        )
    # Pod IPs wrap at 65k; the port keeps every (ip, port) endpoint distinct.
    port = 8080 + (i * eps) // 65536
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": f"svc-{i}-abc",
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def objects(n: int, eps: int = EPS_PER_SVC) -> tuple[list, list]:
    """n Services (198.19.0.0/16) with `eps` endpoints each, as raw API dicts."""
    return [_service(i) for i in range(n)], [_slice(i, eps) for i in range(n)]


def changed_slice(svc_index: int, eps: int = EPS_PER_SVC, generation: int = 1) -> dict:
    """The slice of svc-<i> with its last endpoint replaced (one endpoint changed)."""
    sl = _slice(svc_index, eps)
    sl["endpoints"][-1]["addresses"] = [f"198.18.255.{generation % 250 + 1}"]
    return sl


# -- inner: runs inside a fresh network namespace -------------------------------------------


def _restore(binary: str, text: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [binary, "-w", "5", "--noflush", "--counters"], input=text.encode(), capture_output=True
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{binary} failed: {r.stderr.decode()[:500]}")
    return dt


def _apply(binary: str, res) -> float:
    """Restore a RenderResult the way the data plane does: chunks (nft), then the text."""
    return sum(_restore(binary, part) for part in res.pre) + _restore(binary, res.text)


def inner(n: int, repeat: int, backend: str) -> dict:
    from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
    from proxy.iptables.dataplane import NFT_CHUNK_CHAINS
    from proxy.iptables.render import RenderConfig, render

    binary = f"iptables-{backend}-restore"
    chunk = NFT_CHUNK_CHAINS if backend == "nft" else 0
    store = Store()
    svcs, slices = objects(n)
    store.replace(SERVICE, svcs)
    store.replace(ENDPOINT_SLICE, slices)
    model = store.snapshot().model
    cfg = RenderConfig(family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",))

    renders, restores = [], []
    state = None
    for _ in range(repeat):
        # Cold render (no previous state, so no fragment reuse): the honest full-sync cost.
        t0 = time.perf_counter()
        res = render(model, cfg, changed=None, previous=None, chunk_chains=chunk)
        renders.append(time.perf_counter() - t0)
        restores.append(_apply(binary, res))
        state = res.state
    rules = dict(res.rules)

    p_render, p_restore = [], []
    for g in range(repeat):
        store.upsert(ENDPOINT_SLICE, changed_slice(n // 2, generation=g + 1))
        snap = store.snapshot()
        assert snap.changed, "the endpoint change was not tracked"
        t0 = time.perf_counter()
        res = render(snap.model, cfg, changed=snap.changed, previous=state, chunk_chains=chunk)
        p_render.append(time.perf_counter() - t0)
        p_restore.append(_apply(binary, res))
        state = res.state
    med = statistics.median
    return {
        "services": n,
        "endpoints": n * EPS_PER_SVC,
        "backend": backend,
        "rules": rules,
        "full_render_s": med(renders),
        "full_restore_s": med(restores),
        "full_restore_first_s": restores[0],
        "partial_render_s": med(p_render),
        "partial_restore_s": med(p_restore),
        "partial_text_lines": res.text.count("\n"),
        "restore_chunks": len(render(model, cfg, chunk_chains=chunk).pre) + 1,
    }


# -- outer: namespaces, daemon, API server ---------------------------------------------------


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)


def run_inner(ns: str, n: int, repeat: int, backend: str) -> dict:
    r = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            __file__,
            "--inner",
            str(n),
            "--repeat",
            str(repeat),
            "--backend",
            backend,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        raise SystemExit(f"inner benchmark failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rss_mb(pid: int, field: str = "VmRSS:") -> float:
    """Resident memory of PID in MB (VmRSS; VmHWM for the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def daemon_latency(ns: str, n: int, repeat: int, workdir: Path, mode: str = "iptables") -> dict:
    """Real daemon (--proxy-mode=MODE) + list/watch API server in namespace `ns`: first
    full sync, watch event → rules applied, resident memory (now and peak)."""
    from proxy.testbed.apiserver import ApiServerClient  # admin client of the process mode

    svcs, slices = objects(n)
    load = workdir / f"objects-{n}.json"
    load.write_text(json.dumps({"kind": "List", "items": svcs + slices}))
    port = 16443
    api_log = open(workdir / f"apiserver-{n}.log", "w")  # noqa: SIM115
    api = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "proxy.testbed.apiserver",
            "--listen",
            f"127.0.0.1:{port}",
            "--load",
            str(load),
        ],
        cwd=ROOT,
        stdout=api_log,
        stderr=subprocess.STDOUT,
    )
    daemon = None
    try:
        client = ApiServerClient(ns, f"127.0.0.1:{port}")
        client.wait_ready(60)
        kubeconfig = workdir / "kubeconfig"
        client.write_kubeconfig(kubeconfig)
        dlog_path = workdir / f"daemon-{mode}-{n}.log"
        dlog = open(dlog_path, "w")  # noqa: SIM115
        daemon = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "proxy",
                f"--kubeconfig={kubeconfig}",
                f"--proxy-mode={mode}",
                "--hostname-override=node-a",
                "--cluster-cidr=198.18.0.0/16",
                "--iptables-min-sync-period=0s",
                "--healthz-bind-address=127.0.0.1:10256",
                "--metrics-bind-address=",
                "--iptables-sync-period=1h",
            ],
            cwd=ROOT,
            stdout=dlog,
            stderr=subprocess.STDOUT,
        )
        t0 = time.monotonic()
        first_line = _wait_log(dlog_path, "synced", 1, 1800, daemon)
        first_sync = time.monotonic() - t0
        # "synced N services (full, N changed) in X.XXXs": the sync's own duration
        full_sync = float(first_line.rsplit(" in ", 1)[1].rstrip("s"))
        time.sleep(1.0)
        rss = rss_mb(daemon.pid)  # ip netns exec execs: the daemon's own PID
        lat = []
        for g in range(repeat):
            before = _count(dlog_path, "(partial")
            t0 = time.time()
            client.put(changed_slice(n // 2, generation=g + 1))
            line = _wait_log(dlog_path, "(partial", before + 1, 120, daemon)
            lat.append(_log_time(line) - t0)
            time.sleep(0.3)
        rss_after = rss_mb(daemon.pid)
        return {
            "mode": mode,
            "first_sync_s": first_sync,
            "full_sync_s": full_sync,
            "peak_rss_mb": rss_mb(daemon.pid, "VmHWM:"),
            "event_to_applied_s": statistics.median(lat),
            "event_to_applied_all_s": lat,
            "rss_mb": rss,
            "rss_after_changes_mb": rss_after,
        }
    finally:
        for p in (daemon, api):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def _count(path: Path, needle: str) -> int:
    return path.read_text(errors="replace").count(needle)


def _wait_log(path: Path, needle: str, count: int, timeout: float, proc) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if needle in ln]
        if len(lines) >= count:
            return lines[count - 1]
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited: {path.read_text()[-2000:]}")
        time.sleep(0.01)
    raise SystemExit(f"timeout waiting for {needle!r} x{count} in {path}")


def _log_time(line: str) -> float:
    """Wall-clock time of a daemon log line ("2026-11-22 03:29:21,792 I ...")."""
    import datetime as dt

    stamp = " ".join(line.split()[:2])
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['services'] // 1000}k svc" for r in results]
    x = range(len(results))
    w = 0.38
    ax[0].bar([i - w / 2 for i in x], [r["full_render_s"] for r in results], w, label="render")
    ax[0].bar(
        [i + w / 2 for i in x], [r["full_restore_s"] for r in results], w, label="iptables-restore"
    )
    ax[0].set_xticks(list(x), labels)
    ax[0].set_ylabel("seconds (log scale)")
    ax[0].set_yscale("log")
    ax[1].set_yscale("log")
    ax[0].set_title("full sync")
    ax[0].legend()
    full = [r["full_render_s"] + r["full_restore_s"] for r in results]
    part = [r["partial_render_s"] + r["partial_restore_s"] for r in results]
    ev = [r.get("daemon", {}).get("event_to_applied_s", 0) for r in results]
    ax[1].bar([i - w for i in x], full, w * 0.9, label="full sync")
    ax[1].bar(list(x), part, w * 0.9, label="1-endpoint partial sync")
    ax[1].bar([i + w for i in x], ev, w * 0.9, label="watch event → applied (daemon)")
    ax[1].set_xticks(list(x), labels)
    ax[1].set_title("one endpoint change vs full sync")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    ap.add_argument("--no-daemon", action="store_true", help="skip the daemon/watch part")
    ap.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        print(json.dumps(inner(a.inner, a.repeat, a.backend)))
        return 0
    if os.geteuid() != 0:
        print("control_plane: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(f"/tmp/kpb-cp-{uuid.uuid4().hex[:6]}")
    workdir.mkdir()
    results = []
    for n in [int(s) for s in a.sizes.split(",")]:
        for phase in ("inner", "daemon"):
            if phase == "daemon" and a.no_daemon:
                continue
            ns = f"kpb-{uuid.uuid4().hex[:6]}"
            sh("ip", "netns", "add", ns)
            try:
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                if phase == "inner":
                    r = run_inner(ns, n, a.repeat, a.backend)
                    results.append(r)
                else:
                    results[-1]["daemon"] = daemon_latency(ns, n, a.repeat, workdir)
            finally:
                subprocess.run(["ip", "netns", "del", ns], check=False)
        r = results[-1]
        full = r["full_render_s"] + r["full_restore_s"]
        part = r["partial_render_s"] + r["partial_restore_s"]
        print(
            f"{n:>6} services: rules nat={r['rules'].get('nat')} | full sync {full:.3f}s = "
            f"render {r['full_render_s']:.3f}s + restore {r['full_restore_s']:.3f}s "
            f"(render/restore {r['full_render_s'] / r['full_restore_s']:.2f}) | 1-endpoint "
            f"partial {part:.3f}s ({part / full:.3f} of full)",
            flush=True,
        )
        if "daemon" in r:
            d = r["daemon"]
            print(
                f"        daemon: first sync {d['first_sync_s']:.2f}s, watch event → applied "
                f"{d['event_to_applied_s']:.3f}s ({d['event_to_applied_s'] / full:.3f} of full "
                f"sync), RSS {d['rss_mb']:.0f} MB",
                flush=True,
            )
    out = {
        "machine": os.uname().nodename,
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    stem = "control_plane" if a.backend == "nft" else f"control_plane_{a.backend}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    plot(results, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
