"""Control plane: the daemon's full sync and memory over a curve of cluster sizes, next to
the kernel tool's own time for the very ruleset the daemon wrote.

For each size (Services × endpoints per Service) and each round, alternating:
  * `<mode> mode`: a fresh virtual node, the list/watch test API server holding the
    cluster (in this process, listening inside the node), then the real daemon started
    there. Measured: daemon start → first full sync logged (every Service programmed),
    its peak RSS during that start (VmHWM: the relist and the first sync count), its
    RSS once settled, and one endpoint change → applied (watch event to partial sync).
    The ruleset it wrote is saved (`iptables-save`).
  * the reference (`iptables-restore`): that saved ruleset restored in one go into another
    fresh namespace: what the kernel tool alone needs for the same rules.
Both also by CPU time (user + system, the daemon's with the restores it ran): on the
shared machine a start's wall time is mostly its CPU time over the share it got, so the
CPU ratio says where the work is when the load makes wall times drift.

Data planes are entries of CONTENDERS; the nftables mode adds its own when it exists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.testbed import Testbed
from proxy.testbed.apiserver import AdminClient, ApiServer, write_kubeconfig

from .core import Run, SuiteResult, Target, alternate
from .machine import cpu_seconds, ensure_tools, loadavg, rss_kib

SIZES = (100, 1000, 5000, 10000, 20000)
QUICK_SIZES = (100, 1000)
NODE = "node-a"
EPS_PER_SVC = 10
API_PORT = 16443
# The targets (10k Services × 10 endpoints).
SYNC_RATIO_TARGET = Target("<=", 1.5)
PEAK_RSS_TARGET = Target("<=", 200, of="value")
TARGET_SIZE = 10000


@dataclass(frozen=True)
class ControlContender:
    """A data plane (`--proxy-mode`) and the kernel tool that loads its saved ruleset."""

    mode: str
    reference: str
    save: tuple[str, ...]
    restore: tuple[str, ...]
    tools: tuple[str, ...]
    daemon_args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.mode} mode"


def contenders(backend: str) -> list[ControlContender]:
    out = [
        ControlContender(
            mode="iptables",
            reference="iptables-restore",
            save=(f"iptables-{backend}-save",),
            restore=(f"iptables-{backend}-restore", "-w", "5"),
            tools=(f"iptables-{backend}-restore",),
            daemon_args=(f"--iptables-backend={backend}",),
        )
    ]
    if _has_mode("nftables"):
        out.append(
            ControlContender(
                mode="nftables",
                reference="nft -f",
                save=("nft", "list", "ruleset"),
                restore=("nft", "-f", "-"),
                tools=("nft",),
            )
        )
    return out


def _has_mode(mode: str) -> bool:
    from proxy.config import MODES

    return mode in MODES


# -- the cluster ----------------------------------------------------------------------------


def _service(i: int) -> dict[str, Any]:
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": f"svc-{i}", "namespace": "bench"},
        "spec": {
            "clusterIP": f"198.19.{i // 256 % 256}.{i % 256}",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def _slice(i: int, eps: int) -> dict[str, Any]:
    endpoints = []
    for j in range(eps):
        k = i * eps + j
        endpoints.append(
            {
                "addresses": [f"198.18.{(k // 256) % 256}.{k % 256}"],
                "conditions": {"ready": True},
                "nodeName": NODE,
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


def objects(n: int, eps: int = EPS_PER_SVC) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """n Services (198.19.0.0/16) and their slices of `eps` endpoints, as raw API dicts."""
    return [_service(i) for i in range(n)], [_slice(i, eps) for i in range(n)]


def changed_slice(i: int, eps: int, generation: int) -> dict[str, Any]:
    """svc-<i>'s slice with its last endpoint replaced (one endpoint changed)."""
    sl = _slice(i, eps)
    sl["endpoints"][-1]["addresses"] = [f"198.18.255.{generation % 250 + 1}"]
    return sl


# -- one daemon start ------------------------------------------------------------------------

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SYNCED = re.compile(r"synced (\d+) services \((full|partial)")


def _log_time(line: str) -> float:
    m = LOG_TIME.match(line)
    if not m:
        raise ValueError(f"no timestamp in {line!r}")
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _wait_sync(px: Any, kind: str, after: int, timeout: float) -> tuple[float, int]:
    """Wall time of the first `kind` sync logged after `after` syncs; its sync number."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in px.logs().splitlines() if SYNCED.search(ln)]
        for k, ln in enumerate(lines[after:], start=after + 1):
            m = SYNCED.search(ln)
            if m and m.group(2) == kind:
                return _log_time(ln), k
        if not px.alive():
            raise RuntimeError(f"daemon exited:\n{px.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {kind} sync in {timeout:.0f}s:\n{px.log_tail()}")
        time.sleep(0.05)


def daemon_start(
    c: ControlContender,
    objs: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    n: int,
    eps: int,
    gen: int,
    work: Path,
    profile: Path | None = None,
    sync_timeout: float | None = None,
    pythonpath: str | None = None,
) -> dict[str, Any]:
    """Start the daemon against a loaded API server on a fresh node; measure its start.
    `sync_timeout`: how long the first full sync may take (default grows with n);
    `pythonpath`: run the daemon of that checkout instead (--baseline)."""
    stem = f"{c.mode}{'-baseline' if pythonpath else ''}-{n}-{gen}"
    with Testbed(workdir=work / stem) as tb:
        node = tb.add_node(NODE, underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
        api = ApiServer()
        for o in objs[0] + objs[1]:
            api.apply(o)
        sock = node.socket()
        sock.bind(("127.0.0.1", API_PORT))
        api.start(sock)
        try:
            kubeconfig = write_kubeconfig(tb.workdir / "kubeconfig", f"http://127.0.0.1:{API_PORT}")
            load_start = loadavg()
            t0 = time.time()
            px = node.start_proxy(
                [
                    f"--kubeconfig={kubeconfig}",
                    f"--proxy-mode={c.mode}",
                    f"--hostname-override={NODE}",
                    "--cluster-cidr=198.18.0.0/16",
                    "--iptables-min-sync-period=0s",
                    "--iptables-sync-period=1h",
                    "--healthz-bind-address=",
                    "--metrics-bind-address=",
                    *c.daemon_args,
                ],
                # PYTHONSAFEPATH: `-m proxy` must not find this checkout in the cwd first
                env={"PYTHONPATH": pythonpath, "PYTHONSAFEPATH": "1"} if pythonpath else None,
            )
            prof = Profiler(px.pid, profile, stem) if profile else None
            try:
                t_sync, k = _wait_sync(px, "full", 0, timeout=sync_timeout or 120 + n * 0.05)
                cpu = cpu_seconds(px.pid, children=True)  # read within 50 ms of the log line
            finally:
                if prof is not None:
                    prof.stop(px.logs(), t0)
            peak = rss_kib(px.pid, "VmHWM")
            load_synced = loadavg()
            admin = AdminClient(f"http://127.0.0.1:{API_PORT}", netns=node.ns)
            t1 = time.time()
            admin.put(changed_slice(n // 2, eps, gen))
            t_part, _ = _wait_sync(px, "partial", k, timeout=60 + n * 0.01)
            rss = rss_kib(px.pid, "VmRSS")
            peak = rss_kib(px.pid, "VmHWM") or peak
            saved = node.exec(list(c.save), timeout=600).stdout
            px.stop()
        finally:
            api.stop()
    return {
        "sync_s": t_sync - t0,
        "partial_s": t_part - t1,
        "cpu_s": cpu,
        "peak_rss_mib": (peak or 0) / 1024,
        "rss_mib": (rss or 0) / 1024,
        "ruleset": saved,
        "load": {"loadavg_start": load_start, "loadavg_synced": load_synced},
    }


# The counters kube-proxy's rules name must exist before a ruleset using them loads.
_ENSURE_NFACCT = (
    "from proxy.iptables.nfacct import NfAcct\n"
    "from proxy.iptables.render import NFACCT_COUNTERS\n"
    "n = NfAcct()\n"
    "for c in NFACCT_COUNTERS:\n"
    "    n.ensure(c)\n"
    "n.close()\n"
)


def reference_restore(
    c: ControlContender, ruleset: str, n: int, gen: int, work: Path
) -> tuple[float, float]:
    """Seconds for the kernel tool to load `ruleset` into a fresh namespace: wall, CPU."""
    with Testbed(workdir=work / f"{c.mode}-ref-{n}-{gen}") as tb:
        host = tb.add_external("restore", "198.18.200.2")
        if "--nfacct-name" in ruleset:  # the daemon's rules count into nfacct counters
            host.python(_ENSURE_NFACCT)
        c0 = _children_cpu()
        t0 = time.perf_counter()
        host.exec(list(c.restore), input=ruleset, timeout=3600)
        return time.perf_counter() - t0, _children_cpu() - c0


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Profiler:
    """--profile: py-spy samples the daemon's start (collapsed stacks, threads apart) and a
    thread samples its RSS every 50 ms; written with the daemon's log lines, so a peak can
    be matched to what the daemon was doing."""

    def __init__(self, pid: int, out: Path, stem: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.pid, self.out, self.stem = pid, out, stem
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.spy = None
        spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if spy:
            argv = [spy, "record", "--pid", str(pid), "--rate", "100", "--threads",
                    "--format", "raw", "--output", str(out / f"{stem}.pyspy.txt")]  # fmt: skip
            self.spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            kib = rss_kib(self.pid)
            if kib is None:
                return
            self.samples.append((time.time(), kib))

    def stop(self, log: str, t0: float) -> None:
        self._stop.set()
        self._thread.join()
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            self.spy.wait(60)
        events = []
        for line in log.splitlines():
            with contextlib.suppress(ValueError):
                events.append((round(_log_time(line) - t0, 3), line[24:160]))
        doc = {"rss_mib": [(round(t - t0, 3), round(k / 1024, 1)) for t, k in self.samples],
               "log": events}  # fmt: skip
        (self.out / f"{self.stem}.timeline.json").write_text(json.dumps(doc, indent=1))


# -- the suite -------------------------------------------------------------------------------


def run(ctx: Run) -> SuiteResult:
    o = ctx.options
    sizes = o.services or (QUICK_SIZES if ctx.quick else SIZES)
    eps = o.endpoints
    rounds = o.rounds or (1 if ctx.quick else 3)
    res = SuiteResult(
        settings={
            "sizes": list(sizes),
            "endpoints_per_service": eps,
            "rounds": rounds,
            "backend": o.iptables_backend,
        }
    )
    work = ctx.out / "work" / "control-plane"
    work.mkdir(parents=True, exist_ok=True)
    cs = []
    modes = getattr(o, "modes", None)
    for c in contenders(o.iptables_backend):
        if modes and c.mode not in modes:
            continue
        why = ensure_tools(list(c.tools), ctx.install)
        if why:
            res.missing[c.name] = "; ".join(why.values())
        else:
            cs.append(c)
    base = o.baseline
    per = 3 if base else 2
    step = ctx.task("control plane", total=len(sizes) * rounds * per * max(1, len(cs)))
    for n in sizes:
        objs = objects(n, eps)
        for c in cs:
            figs = {
                "sync": res.figure(
                    f"full sync, {c.mode} mode: daemon start → all Services programmed",
                    unit="s",
                    product=c.name,
                    reference=c.reference,
                    better="lower",
                    services=n,
                    # Issue 10's target is the iptables mode's; the nftables mode's
                    # (issue 11: <= 0.2x the iptables mode's sync) is nft_control_plane's.
                    target=SYNC_RATIO_TARGET if n == TARGET_SIZE and c.mode == "iptables" else None,
                ),
                "cpu": res.figure(
                    f"CPU time to all Services programmed, {c.mode} mode (with children)",
                    unit="s",
                    product=c.name,
                    reference=c.reference,
                    better="lower",
                    services=n,
                ),
                "peak": res.figure(
                    f"peak RSS during start, {c.mode} mode",
                    unit="MiB",
                    product=c.name,
                    better="lower",
                    services=n,
                    target=PEAK_RSS_TARGET if n == TARGET_SIZE else None,
                ),
                "rss": res.figure(
                    f"RSS after start, {c.mode} mode",
                    unit="MiB",
                    product=c.name,
                    better="lower",
                    services=n,
                ),
                "partial": res.figure(
                    f"one endpoint change → applied, {c.mode} mode",
                    unit="s",
                    product=c.name,
                    better="lower",
                    services=n,
                ),
            }
            ruleset = None
            # --baseline: the same daemon from another checkout, as one more contender
            daemons = {c.name: None} | ({f"{c.name} @baseline": str(base)} if base else {})
            for r, who in alternate([*daemons, c.reference], rounds):
                if who in daemons or ruleset is None:
                    name = who if who in daemons else c.name
                    step(f"control plane: {name}, {n} Services, round {r + 1}")
                    try:
                        d = daemon_start(
                            c, objs, n, eps, r + 1, work, o.profile, pythonpath=daemons[name]
                        )
                    except (RuntimeError, TimeoutError, OSError) as e:  # keep the others
                        res.missing.setdefault(name, f"failed at {n} Services: {e}"[:300])
                        step.done(2 if who not in daemons else 1)
                        continue
                    if name == c.name:
                        ruleset = d["ruleset"]
                    # Same-run ratios only mean something with the machine's load beside them.
                    res.extra.setdefault("loadavg", []).append(
                        {"contender": name, "services": n, "round": r + 1, **d["load"]}
                    )
                    figs["sync"].add(name, d["sync_s"])
                    figs["cpu"].add(name, d["cpu_s"])
                    figs["peak"].add(name, d["peak_rss_mib"])
                    figs["rss"].add(name, d["rss_mib"])
                    figs["partial"].add(name, d["partial_s"])
                    step.done()
                    if who in daemons:
                        continue
                step(f"control plane: {c.reference}, {n} Services, round {r + 1}")
                load = loadavg()
                wall, cpu = reference_restore(c, ruleset, n, r + 1, work)
                figs["sync"].add(c.reference, wall)
                figs["cpu"].add(c.reference, cpu)
                when = {"contender": c.reference, "services": n, "round": r + 1}
                when |= {"loadavg_start": load, "loadavg_end": loadavg()}
                res.extra.setdefault("loadavg", []).append(when)
                step.done()
            if ruleset is not None:
                res.extra.setdefault("rules", {})[f"{c.mode}/{n}"] = _rule_count(ruleset)
    return res


def _rule_count(saved: str) -> int:
    return sum(1 for line in saved.splitlines() if line.startswith(("-A ", "add rule")))
