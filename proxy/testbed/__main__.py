"""`python -m proxy.testbed list|cleanup [--force] [GLOB]`: inspect or remove leftovers."""

from __future__ import annotations

import argparse
import logging
import sys

from . import cleanup, netns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proxy.testbed", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="testbed namespaces and whether their owner is alive")
    c = sub.add_parser("cleanup", help="remove namespaces left by crashed testbed runs")
    c.add_argument("glob", nargs="?", default="kpt*", help="namespace name glob (kpt*)")
    c.add_argument("--force", action="store_true", help="also remove those of live owners")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cmd == "list":
        for name in netns.list_names():
            if name.startswith(cleanup.FAMILY):
                owner = cleanup.owner_prefix(name)
                state = "live" if owner and cleanup.owner_alive(owner) else "stale?"
                print(f"{name}\t{state}")
        return 0
    removed = cleanup.cleanup_stale(a.glob, force=a.force)
    print(f"removed {len(removed)} namespace(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
