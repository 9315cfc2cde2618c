"""The installed `kube-proxy-py-bench` tool, end to end at its smallest sizes.

Asserts the report's shape, never a timing: every suite ran, every contender of every
suite produced a figure, control-plane figures carry their Service count, the report has
one table per suite and the plots are real PNG images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
from kube_proxy_py_bench import control_plane, data_plane, dns

SCRIPT = Path(sys.executable).parent / "kube-proxy-py-bench"


def test_all_quick_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    argv = [str(SCRIPT), "all", "--quick", "--out", str(out), "--rounds", "1",
            "--duration", "0.5", "--services", "50,200", "--streams", "1,4",
            "--dns-names", "100"]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["machine"]["cpus"] >= 1 and "loadavg_end" in doc["machine"]
    suites = doc["suites"]
    assert set(suites) == {"control-plane", "data-plane", "dns"}
    expected = {
        "control-plane": {
            n for c in control_plane.contenders("nft") for n in (c.name, c.reference)
        },
        "data-plane": {c.name for c in data_plane.contenders()},
        "dns": {c.name for c in dns.CONTENDERS},
    }
    for name, suite in suites.items():
        assert suite["missing"] == {}, (name, suite["missing"])
        figs = suite["figures"]
        assert figs, name
        for f in figs:
            assert {"name", "unit", "contenders", "ratio", "target", "met"} <= set(f), f
        produced = {c for f in figs for c, v in f["contenders"].items() if v is not None}
        assert produced == expected[name], (name, produced)
        targets = [f for f in figs if f["target"]]
        assert all(isinstance(f["met"], bool) for f in targets), name
    cp = suites["control-plane"]["figures"]
    assert {f["services"] for f in cp} == {50, 200}
    sync = [f for f in cp if f["name"].startswith("full sync")]
    assert all(f["ratio"] > 0 for f in sync)

    report = (out / "report.md").read_text()
    for title in ("## Control plane", "## Data plane", "## Cluster DNS"):
        assert title in report
    for suite in suites.values():
        for f in suite["figures"]:
            assert f"| {f['name']} |" in report
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["control-plane.png", "data-plane.png", "dns.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w = matplotlib.image.imread(png).shape[:2]
        assert h > 200 and w > 400, (png, h, w)
    assert not (out / "work").exists()  # logs removed after a successful run
