"""Client address: what keeping the client's address at the endpoint costs the userspace mode.

    kube-proxy-py-bench client-address [--quick] [--rounds N]

The data-plane suite's node (a server pod with iperf3 and an HTTP responder, a client pod
on the same node, the daemon pinned to CPU 1), with the userspace mode run twice per round:

  client address kept   the default: connections to the endpoint are IP_TRANSPARENT and bound
                        to the client's address (proxy/userspace/transparent.py)
  node address          --userspace-preserve-client-ip=off: the endpoint sees the node

Figures: throughput with 1 and 32 iperf3 streams, new connections per second (an HTTP/1.0
request per connection, 64 in flight) and the proxy's CPU per connection. Target (issue 12):
within 10 % of the node-address figures (ratio ≥ 0.9).
"""

from __future__ import annotations

from typing import Any

from proxy.testbed import Testbed

from .core import Run, SuiteResult, Target, alternate
from .data_plane import CPS_INFLIGHT, Bench
from .machine import cpu_seconds, ensure_tools

KEPT, NODE = "client address kept", "node address"
FLAGS = {KEPT: (), NODE: ("--userspace-preserve-client-ip", "off")}


def run(ctx: Run) -> SuiteResult:
    o = ctx.options
    rounds = o.rounds or (2 if ctx.quick else 5)
    res = SuiteResult(settings={"rounds": rounds, "duration_s": o.duration})
    base = ensure_tools(["iperf3", "haproxy", "taskset"], ctx.install)
    if base:
        res.missing["all"] = "; ".join(base.values())
        return res

    def fig(name: str, unit: str, better: str = "higher", t: Target | None = None) -> Any:
        return res.figure(name, unit=unit, product=KEPT, reference=NODE, better=better, target=t)

    f1 = fig("throughput, 1 stream", "Gbit/s", t=Target(">=", 0.9))
    f32 = fig("throughput, 32 streams", "Gbit/s", t=Target(">=", 0.9))
    fcps = fig("new connections/s", "conn/s", t=Target(">=", 0.9))
    fcpu = fig("proxy CPU per connection", "µs", "lower")
    step = ctx.task("client address", total=rounds * 2)
    with Testbed(workdir=ctx.out / "work" / "client-address") as tb:
        bench = Bench(tb, o)
        for r, name in alternate([KEPT, NODE], rounds):
            step(f"client address: {name}, round {r + 1}")
            with bench.daemon("userspace", *FLAGS[name]) as ep:
                bench.loadgen("cps", ep.ip, ep.http_port, 0.3, 8)  # warm-up
                f1.add(name, bench.iperf(ep, 1))
                f32.add(name, bench.iperf(ep, 32))
                assert ep.pid is not None
                c0 = cpu_seconds(ep.pid)
                c = bench.loadgen("cps", ep.ip, ep.http_port, o.duration, CPS_INFLIGHT)
                fcps.add(name, c["per_second"])
                if c["conns"]:
                    fcpu.add(name, (cpu_seconds(ep.pid) - c0) * 1e6 / c["conns"])
            step.done()
    return res
