"""`kube-proxy-py` / `python -m proxy`: parse flags, set up logging, run the daemon."""

from __future__ import annotations

import logging
import sys

from proxy.config import UsageError, parse_args


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        force=True,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The kubernetes client and aiohttp are chatty at info; their warnings still show.
    for noisy in ("kubernetes", "urllib3", "aiohttp.access", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # urllib3 warns on each of its immediate retries; the watch logs one line per failed
    # request itself, saying what to do.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _setup_logging("info")  # the config file's warnings are logged while it is read
    try:
        cfg = parse_args(argv)
    except UsageError as e:
        print(f"kube-proxy-py: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    import uvloop

    from proxy.daemon import run

    try:
        return uvloop.run(run(cfg))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        usage = _find_usage_error(e)
        if usage is None:
            raise
        logging.getLogger("proxy").error("%s", usage)
        print(f"kube-proxy-py: error: {usage}", file=sys.stderr)
        return 2


def _find_usage_error(e: BaseException) -> UsageError | None:
    """A UsageError, also when a task group wrapped it in an ExceptionGroup."""
    if isinstance(e, UsageError):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _find_usage_error(sub)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
