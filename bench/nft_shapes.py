"""nftables ruleset shapes, timed (not a test: it measures and writes figures).

For N Services x M endpoints, loads each shape into a fresh network namespace, shapes
alternating within a round, and times (a) the full load and (b) a one-Service change
(one endpoint replaced) applied on top:

  kube-proxy   kube-proxy's nftables shape: a chain per Service with `numgen random mod M
               vmap {...}` to a chain per endpoint, dispatched by a `service-ips` vmap
  anon-map     a chain per Service with one `dnat ... numgen ... map {...}` (an anonymous
               map each), no endpoint chains
  flat64       no per-Service chains: one named map (address . port . slot) -> endpoint,
               64 slots per Service (slot k -> endpoint k mod M: NOT an equal share)
  grouped      this project's shape (proxy/nftables/render.py): picker chains per endpoint
               count, every Service an element of named maps, exact shares
  grouped-mixed  the same with every feature in use (NodePorts, LoadBalancers with Local
               policy or source ranges, internalTrafficPolicy Local, affinity, two nodes)

The three reference shapes follow /work/shared/nft-shapes/shapes.py (the issue's).
Loaders compared on the grouped shape: `nft -f` (a process per transaction), libnftables
in-process (ctypes, proxy/nftables/nft.py), and nft's JSON input (`nft -j -f`).

    sudo .venv/bin/python bench/nft_shapes.py --sizes 2000,10000 --rounds 1
Writes bench/results/nft_shapes.json.
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
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def svc_ip(s: int) -> str:
    return f"198.19.{s // 250}.{s % 250 + 1}"


def ep_ip(s: int, e: int, m: int) -> str:
    k = s * m + e
    return f"198.18.{k // 250 % 250}.{k % 250 + 1}"


def ep_port(s: int, m: int) -> int:
    return 8080 + (s * m) // 62500  # keeps (ip, port) unique past 62.5k endpoints


# -- reference shapes (the issue's) --------------------------------------------------------


def kube_proxy(n: int, m: int, change: int | None = None) -> str:
    out = []
    w = out.append
    if change is None:
        w("table ip kp {")
        w(" map service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }")
        w(" chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }")
        w(
            " chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; "
            "jump services; }"
        )
        w(" chain mark-for-masquerade { meta mark set meta mark or 0x4000; }")
        w("}")
    for s in range(n) if change is None else [change]:
        eps = []
        for e in range(m):
            ip = ep_ip(s, e, m) if change is None or e < m - 1 else "198.18.255.1"
            name = f"endpoint-{s}-{ip}"
            eps.append(name)
            w(f"add chain ip kp {name}")
            w(f"add rule ip kp {name} ip saddr {ip} jump mark-for-masquerade")
            w(f"add rule ip kp {name} meta l4proto tcp dnat to {ip}:{ep_port(s, m)}")
        vm = ", ".join(f"{i} : goto {c}" for i, c in enumerate(eps))
        w(f"add chain ip kp service-{s}")
        w(f"flush chain ip kp service-{s}")
        w(f"add rule ip kp service-{s} numgen random mod {m} vmap {{ {vm} }}")
    if change is None:
        for s in range(n):
            w(f"add element ip kp service-ips {{ {svc_ip(s)} . tcp . 80 : goto service-{s} }}")
    else:
        old = f"endpoint-{change}-{ep_ip(change, m - 1, m)}"
        w(f"flush chain ip kp {old}")
        w(f"delete chain ip kp {old}")
    return "\n".join(out) + "\n"


def anon_map(n: int, m: int, change: int | None = None) -> str:
    out = []
    w = out.append
    if change is None:
        w("table ip kp {")
        w(" map service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }")
        w(" chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }")
        w(
            " chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; "
            "jump services; }"
        )
        w("}")
    for s in range(n) if change is None else [change]:
        ips = [ep_ip(s, e, m) for e in range(m)]
        if change is not None:
            ips[-1] = "198.18.255.1"
        mp = ", ".join(f"{e} : {ip} . {ep_port(s, m)}" for e, ip in enumerate(ips))
        w(f"add chain ip kp service-{s}")
        w(f"flush chain ip kp service-{s}")
        w(
            f"add rule ip kp service-{s} meta l4proto tcp dnat ip to numgen random mod {m} "
            f"map {{ {mp} }}"
        )
    if change is None:
        for s in range(n):
            w(f"add element ip kp service-ips {{ {svc_ip(s)} . tcp . 80 : goto service-{s} }}")
    return "\n".join(out) + "\n"


def flat64(n: int, m: int, change: int | None = None, slots: int = 64) -> str:
    out = []
    w = out.append
    if change is None:
        w("table ip kp {")
        w(
            f" map backends {{ typeof ip daddr . th dport . numgen random mod {slots} : "
            "ip daddr . th dport; size 4194304; }"
        )
        w(" set services { type ipv4_addr . inet_proto . inet_service; size 1048576; }")
        w(
            " chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; "
            "ip daddr . meta l4proto . th dport @services meta l4proto tcp dnat ip to "
            f"ip daddr . th dport . numgen random mod {slots} map @backends; }}"
        )
        w("}")
        for s in range(n):
            w(f"add element ip kp services {{ {svc_ip(s)} . tcp . 80 }}")
            els = ", ".join(
                f"{svc_ip(s)} . 80 . {k} : {ep_ip(s, k % m, m)} . {ep_port(s, m)}"
                for k in range(slots)
            )
            w(f"add element ip kp backends {{ {els} }}")
    else:
        s = change
        keys = [k for k in range(slots) if k % m == m - 1]
        dead = ", ".join(f"{svc_ip(s)} . 80 . {k}" for k in keys)
        w(f"delete element ip kp backends {{ {dead} }}")
        w(
            "add element ip kp backends { "
            + ", ".join(f"{svc_ip(s)} . 80 . {k} : 198.18.255.1 . {ep_port(s, m)}" for k in keys)
            + " }"
        )
    return "\n".join(out) + "\n"


# -- this project's shape -----------------------------------------------------------------


def _mixed(s: int) -> dict:
    """Every feature somewhere: per 100 Services, 30 NodePorts, 10 LoadBalancers (half
    externalTrafficPolicy Local, half with source ranges), 10 internalTrafficPolicy Local,
    1 with session affinity; endpoints split over two nodes."""
    from proxy.model import PortSpec

    k = s % 100
    spec: dict = {"ports": (PortSpec("http", "TCP", 80, 30000 + s % 2700 if k < 40 else 0),)}
    if k < 10:
        spec["type"] = "LoadBalancer"
        spec["load_balancer_ips"] = (f"198.19.{200 + s // 250 % 50}.{s % 250 + 1}",)
        if k < 5:
            spec["external_traffic_local"] = True
        else:
            spec["load_balancer_source_ranges"] = ("10.0.0.0/8", "192.168.0.0/16")
    elif k < 40:
        spec["type"] = "NodePort"
    elif k < 50:
        spec["internal_traffic_local"] = True
    elif k == 50:
        spec["session_affinity_timeout"] = 10800
    return spec


def model(n: int, m: int, changed: int | None = None, mixed: bool = False):
    from proxy.model import Endpoint, PortSpec, Service, ServiceEndpoints, make_model

    services, endpoints = {}, {}
    for s in range(n):
        key = ("bench", f"svc-{s}")
        spec = _mixed(s) if mixed else {"ports": (PortSpec("http", "TCP", 80),)}
        services[key] = Service("bench", f"svc-{s}", cluster_ips=(svc_ip(s),), **spec)
        node = ("node-a", "node-b")
        eps = [
            Endpoint(ep_ip(s, e, m), ep_port(s, m), node_name=node[e % 2 if mixed else 0])
            for e in range(m)
        ]
        if s == changed:
            eps[-1] = Endpoint("198.18.255.1", ep_port(s, m), node_name="node-a")
        endpoints[key] = ServiceEndpoints(ports=MappingProxyType({("http", "TCP"): tuple(eps)}))
    return make_model(services, endpoints)


def grouped(n: int, m: int, mixed: bool = False) -> tuple[str, str]:
    """(full transaction, one-Service change on top of it) from the real renderer."""
    from proxy.nftables.render import NftConfig, render

    cfg = NftConfig(family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",))
    full = render(model(n, m, mixed=mixed), cfg)
    key = ("bench", f"svc-{n // 2}")
    changed = model(n, m, changed=n // 2, mixed=mixed)
    part = render(changed, cfg, changed=frozenset({key}), previous=full.state)
    return full.text, part.text


# -- loading ------------------------------------------------------------------------------


def in_netns(ns: str, argv: list[str], stdin: bytes | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.decode()[:800]}")
    return dt


LIB_SNIPPET = """
import sys, time
sys.path.insert(0, {root!r})
from proxy.nftables.nft import LibNftables
nft = LibNftables()
times = []
for path in sys.argv[1:]:
    text = open(path).read()
    t0 = time.perf_counter()
    r = nft.run(text)
    times.append(time.perf_counter() - t0)
    if r.rc != 0:
        sys.exit(r.err[:800])
print(" ".join(f"{{t:.6f}}" for t in times))
"""


def load_lib(ns: str, paths: list[Path]) -> list[float]:
    """libnftables in one process (as the daemon runs it): full, then the change."""
    code = LIB_SNIPPET.format(root=str(ROOT))
    p = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, *map(str, paths)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"libnftables load failed: {p.stderr[-800:]}")
    return [float(x) for x in p.stdout.split()]


def fresh_ns() -> str:
    ns = f"kpb-nft-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    return ns


def measure(work: Path, name: str, full: str, change: str, loader: str) -> dict:
    f_path = work / f"{name}.nft"
    c_path = work / f"{name}-change.nft"
    f_path.write_text(full)
    c_path.write_text(change)
    ns = fresh_ns()
    try:
        if loader == "lib":
            t_full, t_change = load_lib(ns, [f_path, c_path])
        elif loader == "json":
            # The same ruleset as nft's own JSON (`nft -j list ruleset`), loaded with -j -f.
            in_netns(ns, ["nft", "-f", str(f_path)])
            dump = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset"],
                capture_output=True,
                check=True,
            ).stdout
            in_netns(ns, ["nft", "flush", "ruleset"])
            j_path = work / f"{name}.json"
            j_path.write_bytes(dump)
            t_full = in_netns(ns, ["nft", "-j", "-f", str(j_path)])
            t_change = in_netns(ns, ["nft", "-f", str(c_path)])
        else:
            t_full = in_netns(ns, ["nft", "-f", str(f_path)])
            t_change = in_netns(ns, ["nft", "-f", str(c_path)])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return {"full_s": t_full, "change_s": t_change, "bytes": len(full)}


SHAPES: dict[str, Callable[[int, int], tuple[str, str]]] = {
    "kube-proxy": lambda n, m: (kube_proxy(n, m), kube_proxy(n, m, change=n // 2)),
    "anon-map": lambda n, m: (anon_map(n, m), anon_map(n, m, change=n // 2)),
    "flat64": lambda n, m: (flat64(n, m), flat64(n, m, change=n // 2)),
    "grouped": grouped,
    "grouped-mixed": lambda n, m: grouped(n, m, mixed=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--shapes", default="kube-proxy,anon-map,flat64,grouped,grouped-mixed")
    ap.add_argument("--loaders", default="cli,lib,json", help="loaders for the grouped shape")
    ap.add_argument("--out", default=str(RESULTS / "nft_shapes.json"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("nft_shapes: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    work = Path(f"/tmp/kpb-nft-{uuid.uuid4().hex[:6]}")
    work.mkdir()
    rows: list[dict] = []
    for n in [int(s) for s in a.sizes.split(",")]:
        texts = {s: SHAPES[s](n, a.endpoints) for s in a.shapes.split(",")}
        for r in range(a.rounds):
            for shape, (full, change) in texts.items():  # alternate within a round
                loaders = a.loaders.split(",") if shape.startswith("grouped") else ["cli"]
                for loader in loaders:
                    try:
                        res = measure(work, f"{shape}-{n}", full, change, loader)
                    except SystemExit as e:  # e.g. nft 1.0.6 cannot read its own JSON
                        print(f"{n:>6} {shape} {loader}: failed: {e}", flush=True)
                        rows.append({"services": n, "shape": shape, "loader": loader,
                                     "error": str(e)[:300]})  # fmt: skip
                        continue
                    row = {"services": n, "endpoints": a.endpoints, "shape": shape,
                           "loader": loader, "round": r, **res}  # fmt: skip
                    rows.append(row)
                    print(
                        f"{n:>6} x {a.endpoints} {shape:<10} {loader:<4} "
                        f"full {res['full_s']:8.3f}s  one-Service change {res['change_s']:.4f}s"
                        f"  ({res['bytes'] / 1e6:.1f} MB)",
                        flush=True,
                    )
    summary: dict[str, dict] = {}
    for row in rows:
        if "error" in row:
            continue
        k = f"{row['services']}/{row['shape']}/{row['loader']}"
        s = summary.setdefault(k, {"full_s": [], "change_s": []})
        s["full_s"].append(row["full_s"])
        s["change_s"].append(row["change_s"])
    med = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in summary.items()}
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(),
           "rows": rows, "median": med}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
