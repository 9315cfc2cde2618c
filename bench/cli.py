"""`kube-proxy-py-bench`: how fast is each mode, next to the alternatives, on this machine.

    kube-proxy-py-bench {control-plane|data-plane|dns|all} [--quick] [--out DIR] [sizes…]
    kube-proxy-py-bench {portforward|client-address} [--quick] [--rounds N]
    kube-proxy-py-bench readme --out DIR [--readme README.md]

Runs as root: it builds its own virtual nodes (network namespaces) and references, runs
every contender in the same run, and removes everything it made on every exit path
(Ctrl-C included). Writes DIR/report.md, DIR/results.json and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import machine, plots, report
from .core import Run, SuiteResult, make_progress

SUITES = ("control-plane", "data-plane", "dns")
# Run by name only (not by `all`): the userspace mode's laptop and client-address figures.
MORE_SUITES = ("portforward", "client-address")


def _suite(name: str) -> Callable[[Run], SuiteResult]:
    if name == "control-plane":
        from .control_plane import run
    elif name == "data-plane":
        from .data_plane import run
    elif name == "portforward":
        from .portforward import run
    elif name == "client-address":
        from .client_address import run
    else:
        from .dns import run
    return run


def _ints(text: str) -> list[int]:
    try:
        return [int(x.replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"expected numbers separated by commas: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


DATA_FIGURES = ("throughput", "cps", "latency", "idle")  # data_plane.measure's groups


def _figures(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in DATA_FIGURES]
    if bad or not names:
        msg = f"expected some of {','.join(DATA_FIGURES)}: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kube-proxy-py-bench", description=__doc__.split("\n")[0])
    p.add_argument("suite", choices=(*SUITES, *MORE_SUITES, "all", "readme"))
    p.add_argument("--quick", action="store_true", help="small sizes, short runs (< 2 min)")
    p.add_argument("--out", type=Path, help="output directory (default bench/results/<time>)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per traffic run (default 5; quick 1)")
    g = p.add_argument_group("control plane")
    g.add_argument("--services", type=_ints, help="Service counts (default 100,1k,5k,10k,20k)")
    g.add_argument("--endpoints", type=int, default=10, help="endpoints per Service (10)")
    g.add_argument("--iptables-backend", choices=("nft", "legacy"), default="nft")
    g.add_argument(
        "--modes",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        help="daemon modes to start, control and data plane (default: all; e.g. userspace)",
    )
    g.add_argument(
        "--profile", type=Path, help="py-spy stacks and an RSS timeline of each daemon start there"
    )
    g = p.add_argument_group("data plane")
    g.add_argument("--streams", type=_ints, help="iperf3 stream counts (default 1,8,32)")
    g.add_argument(
        "--figures",
        type=_figures,
        help=f"only these measurements: {','.join(DATA_FIGURES)} (default: all)",
    )
    g = p.add_argument_group("dns")
    g.add_argument("--dns-names", type=int, default=1000, help="Services named (1000)")
    g.add_argument("--dns-sets", type=lambda s: s.split(","), help="A,mixed,search")
    p.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="report a missing reference tool instead of installing it (apt)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="control and data plane: also run the daemon from this checkout (a before/after "
        "contender)",
    )
    p.add_argument(
        "--keep-work", action="store_true", help="keep DIR/work (logs) after a successful run"
    )
    p.add_argument(
        "--readme",
        type=Path,
        default=Path("README.md"),
        help="readme: the file whose performance section is rewritten",
    )
    return p


def default_out() -> Path:
    """bench/results/<timestamp> of the checkout (or of the working directory)."""
    here = Path(__file__).resolve().parent
    base = here / "results" if (here.parent / "pyproject.toml").exists() else Path("bench/results")
    return base / time.strftime("%Y%m%d-%H%M%S")


def readme(a: argparse.Namespace) -> int:
    if a.out is None or not (a.out / "results.json").exists():
        print("kube-proxy-py-bench: readme needs --out DIR holding a results.json", file=sys.stderr)
        return 2
    doc = json.loads((a.out / "results.json").read_text())
    rel = os.path.relpath(a.out.resolve(), a.readme.resolve().parent)
    report.write_readme(a.readme, doc, rel)
    print(f"{a.readme}: performance section rewritten from {a.out}/results.json")
    return 0


def write(out: Path, doc: dict[str, Any], started: float) -> None:
    doc["seconds"] = time.time() - started
    doc["machine"]["loadavg_end"] = machine.loadavg()
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "report.md").write_text(report.report_md(doc))


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.suite == "readme":
        return readme(a)
    if os.geteuid() != 0:
        print(
            "kube-proxy-py-bench: run as root (it builds network namespaces): "
            "sudo kube-proxy-py-bench ...",
            file=sys.stderr,
        )
        return 2
    if a.duration is None:
        a.duration = 1.0 if a.quick else 5.0
    # Absolute: the reference servers get file paths in their configs and may chdir("/").
    out: Path = (a.out or default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = list(SUITES) if a.suite == "all" else [a.suite]
    started = time.time()
    doc: dict[str, Any] = {
        "command": shlex.join(
            ["kube-proxy-py-bench", *(argv if argv is not None else sys.argv[1:])]
        ),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "quick": a.quick,
        "machine": {**machine.describe(), "loadavg_start": machine.loadavg()},
        "suites": {},
    }
    failed = False
    with make_progress() as progress:
        ctx = Run(out=out, quick=a.quick, options=a, progress=progress, install=a.install)
        try:
            for name in names:
                try:
                    res = _suite(name)(ctx)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # keep the other suites' figures
                    failed = True
                    res = SuiteResult(missing={"all": f"suite failed: {e}".splitlines()[0]})
                    progress.console.print(f"[red]{name} failed:[/red] {e}")
                plot = plots.PLOTS[name](res, out)
                if plot is not None:
                    res.plots.append(plot.name)
                doc["suites"][name] = res.to_json()
                write(out, doc, started)  # a run cut short keeps the suites it finished
        except KeyboardInterrupt:
            # Every testbed has been closed on the way up: nothing of ours is left running.
            print(
                "kube-proxy-py-bench: interrupted; namespaces and processes removed",
                file=sys.stderr,
            )
            return 130
    write(out, doc, started)
    if not failed and not a.keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)  # logs kept only when something failed
    print(f"wrote {out}/report.md, results.json and plots in {doc['seconds']:.0f} s")
    return 1 if failed else 0
