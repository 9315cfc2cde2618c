#!/usr/bin/env python3
"""mypy with a ratchet: the errors left per module may only go down.

Runs mypy as configured in pyproject.toml ([tool.mypy]: strict for the pure cores, normal
elsewhere) and compares the errors per file with .ci/mypy-baseline.txt ("count path" per
line). More errors in a file than its baseline: fail (fix them, the baseline does not
grow). Fewer: fail too, until the baseline is lowered to match, so a fix cannot be undone
later unnoticed:

    .venv/bin/python .ci/mypy_ratchet.py            # check (CI)
    .venv/bin/python .ci/mypy_ratchet.py --update   # after fixing errors: lower the baseline

`--update` refuses to raise any count (it writes the first baseline when there is none).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "mypy-baseline.txt"
ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+: error: ")


def run_mypy() -> tuple[Counter[str], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 1):  # 2: mypy itself failed (bad config, crash)
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mypy failed to run (exit {proc.returncode})")
    counts: Counter[str] = Counter()
    for line in proc.stdout.splitlines():
        m = ERROR.match(line)
        if m:
            counts[m["path"]] += 1
    return counts, proc.stdout


def read_baseline() -> Counter[str]:
    counts: Counter[str] = Counter()
    if BASELINE.exists():
        for line in BASELINE.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                n, path = line.split(maxsplit=1)
                counts[path] = int(n)
    return counts


def write_baseline(counts: Counter[str]) -> None:
    lines = [
        "# mypy errors left per file (.ci/mypy_ratchet.py); may only go down.",
        f"# total {sum(counts.values())}",
        *(f"{n} {path}" for path, n in sorted(counts.items()) if n),
    ]
    BASELINE.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    counts, output = run_mypy()
    base = read_baseline()
    worse = {p: (base[p], n) for p, n in counts.items() if n > base[p]}
    better = {p: (n, counts[p]) for p, n in base.items() if counts[p] < n}
    if "--update" in argv:
        if worse and BASELINE.exists():
            print("mypy-ratchet: not raising the baseline; fix these first:")
            for p, (b, n) in sorted(worse.items()):
                print(f"  {p}: {b} → {n}")
            return 1
        write_baseline(counts)
        print(f"mypy-ratchet: baseline now {sum(counts.values())} errors")
        return 0
    if worse:
        print(f"mypy-ratchet: more type errors than the baseline ({BASELINE.name}):")
        for p, (b, n) in sorted(worse.items()):
            print(f"  {p}: {b} → {n}")
        print("\n".join(ln for ln in output.splitlines() if ln.split(":", 1)[0] in worse))
        return 1
    if better:
        print("mypy-ratchet: fewer type errors than the baseline; lock that in with")
        print("  .venv/bin/python .ci/mypy_ratchet.py --update   (and commit it)")
        for p, (b, n) in sorted(better.items()):
            print(f"  {p}: {b} → {n}")
        return 1
    print(f"mypy-ratchet: {sum(counts.values())} errors, as in the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
