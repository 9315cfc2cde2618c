"""The iptables data plane's nfacct fallback: kube-proxy's counted rules and metrics where
the counters and the `nfacct` match work, the same rules without counters and no
metrics (one log line) where either is missing. iptables is a stand-in script answering
as iptables 1.8.9 does; the counters are a stand-in for the kernel's nfnetlink_acct."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from proxy.config import Config
from proxy.iptables.backend import Backend
from proxy.iptables.dataplane import IptablesDataPlane
from proxy.iptables.nfacct import collector
from proxy.iptables.render import NFACCT_COUNTERS, render
from proxy.model import make_model

INVALID_METRIC = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"
# What `iptables -C INPUT -m nfacct …` prints: the match works (the rule is just absent),
# or the extension / kernel module is missing.
WORKS = "iptables: Bad rule (does a matching rule exist in that chain?).", 1
MISSING = "iptables v1.8.9 (nf_tables): Couldn't load match `nfacct':No such file or directory", 2


class Counters:
    """nfnetlink_acct: counters made on request, or refused (module missing)."""

    def __init__(self, *, available: bool) -> None:
        self.available = available
        self.made: set[str] = set()

    def ensure(self, name: str) -> None:
        if not self.available:
            raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")
        self.made.add(name)

    def packets(self) -> dict[str, int]:
        return {n: 3 for n in self.made}


def plane(tmp_path: Path, answer: tuple[str, int], *, available: bool) -> IptablesDataPlane:
    script = tmp_path / "iptables"
    script.write_text(f'#!/bin/sh\necho "{answer[0]}" >&2\nexit {answer[1]}\n')
    script.chmod(0o755)
    p = IptablesDataPlane(Config(hostname="node-a"))
    p.backends = {4: Backend("nft", 4, str(script), str(script), str(script))}
    p.appliers = {4: None}  # type: ignore[dict-item]  # only its presence is read here
    p.nfacct = Counters(available=available)  # type: ignore[assignment]
    return p


@pytest.mark.parametrize(
    ("answer", "available", "counted"),
    [(WORKS, True, True), (MISSING, True, False), (WORKS, False, False)],
    ids=["both-work", "no-xt_nfacct", "no-nfnetlink_acct"],
)
def test_nfacct_counters_or_a_clean_fallback(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    answer: tuple[str, int],
    available: bool,
    counted: bool,
) -> None:
    p = plane(tmp_path, answer, available=available)
    caplog.set_level(logging.INFO, "proxy.iptables")
    try:
        asyncio.run(p._ensure_nfacct())
        metrics = generate_latest(REGISTRY).decode()
    finally:
        collector(p.nfacct, ())  # the process-wide collector exports nothing again
    text = render(make_model({}, {}), p.render_config(4)).text
    if counted:
        assert p.nfacct_counters == frozenset(NFACCT_COUNTERS)
        assert "-m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP" in text
        assert f"{INVALID_METRIC} 3.0" in metrics
    else:
        assert p.nfacct_counters == frozenset()
        assert "--ctstate INVALID -j DROP" in text and "nfacct" not in text
        assert INVALID_METRIC not in metrics
        (line,) = [r.getMessage() for r in caplog.records if "nfacct" in r.getMessage()]
        assert "rules without packet counters, nfacct metrics off" in line
