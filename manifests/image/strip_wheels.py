"""Strip debug symbols from the shared objects in binary wheels (with binutils' `strip`),
rewriting each wheel's RECORD so pip installs it as usual. Usage: strip_wheels.py DIR"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(whl: Path) -> int:
    """Rewrite `whl` with stripped .so files; returns the bytes saved (0: untouched)."""
    with zipfile.ZipFile(whl) as z:
        infos = z.infolist()
        data = {i.filename: z.read(i) for i in infos}
    sos = [n for n in data if n.endswith(".so") or ".so." in n]
    if not sos:
        return 0
    saved = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in sos:
            f = Path(tmp) / "obj.so"
            f.write_bytes(data[name])
            subprocess.run(["strip", "--strip-unneeded", str(f)], check=True)
            new = f.read_bytes()
            saved += len(data[name]) - len(new)
            data[name] = new
    record = next(n for n in data if n.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.StringIO(data[record].decode())))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    for row in rows:
        if row and row[0] in sos:
            row = [row[0], _digest(data[row[0]]), str(len(data[row[0]]))]
        w.writerow(row)
    data[record] = out.getvalue().encode()
    tmpwhl = whl.with_suffix(".tmp")
    with zipfile.ZipFile(tmpwhl, "w", zipfile.ZIP_DEFLATED) as z:
        for i in infos:
            z.writestr(i, data[i.filename])
    tmpwhl.replace(whl)
    return saved


def main() -> None:
    total = sum(strip_wheel(w) for w in sorted(Path(sys.argv[1]).glob("*.whl")))
    print(f"strip_wheels: {total / 1e6:.1f} MB of debug symbols removed")


if __name__ == "__main__":
    main()
