"""--dns-node-local: cluster DNS on an address the node owns, as NodeLocal DNSCache does
(169.254.20.10 by convention; kubelet's clusterDNS then points at it), answered from this
daemon's own watch cache instead of a separate cache in front of CoreDNS.

- The address lives on a link of its own, `kube-proxy-dns` (a dummy, or a bridge with no
  ports where the kernel has no dummy), so it is local to the node and `--cleanup` can
  tell it apart from everything else.
- In the iptables mode, raw-table NOTRACK rules (chain KUBE-PY-NODE-DNS, jumped to from
  PREROUTING and OUTPUT) keep DNS to and from it out of conntrack: no entry per query, no
  conntrack races or table exhaustion on busy nodes — NodeLocal DNSCache's reason to exist.

`notrack_rules` is pure; `NodeLocalDns` does the I/O (netlink in a worker thread,
iptables-restore and iptables like the iptables mode's applier).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from proxy.config import Config, UsageError
from proxy.iptables import backend as ipt
from proxy.userspace.addresses import AddressOwner

log = logging.getLogger("proxy.dns.nodelocal")

IFNAME = "kube-proxy-dns"
CHAIN = "KUBE-PY-NODE-DNS"
COMMENT = "kube-proxy-py node-local DNS: no conntrack"
BUILTINS = ("PREROUTING", "OUTPUT")


def notrack_rules(ip: str, port: int) -> str:
    """iptables-restore --noflush input: the raw-table chain, both protocols, both ways."""
    prefix = 128 if ":" in ip else 32
    lines = ["*raw", f":{CHAIN} - [0:0]"]
    for proto in ("udp", "tcp"):
        lines.append(f"-A {CHAIN} -d {ip}/{prefix} -p {proto} -m {proto} --dport {port} -j NOTRACK")
        lines.append(f"-A {CHAIN} -s {ip}/{prefix} -p {proto} -m {proto} --sport {port} -j NOTRACK")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _jump(builtin: str) -> list[str]:
    return [builtin, "-m", "comment", "--comment", COMMENT, "-j", CHAIN]


class NodeLocalDns:
    def __init__(self, cfg: Config) -> None:
        if cfg.dns_bind is None:
            raise UsageError("--dns-node-local needs --dns-bind-address (e.g. 169.254.20.10:53)")
        self.cfg = cfg
        self.ip, self.port = cfg.dns_bind
        if ipaddress.ip_address(self.ip).is_unspecified:
            raise UsageError("--dns-node-local: give the address to own in --dns-bind-address")

    def _own(self) -> None:
        owner = AddressOwner("interface", ifname=IFNAME)
        try:
            owner.start()
            errors = owner.apply([self.ip], ()) if self.ip not in owner.owned else {}
        finally:
            owner.close()
        if errors:
            raise UsageError(f"--dns-node-local: cannot own {self.ip}: {errors[self.ip]}")

    async def start(self) -> None:
        """Own the address (before DNS binds it); NOTRACK in the iptables mode."""
        try:
            await asyncio.to_thread(self._own)
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"--dns-node-local: cannot own {self.ip} ({e}); needs root") from None
        log.info("node-local DNS: %s is this node's (link %s)", self.ip, IFNAME)
        if self.cfg.proxy_mode == "iptables":
            await self._notrack()

    async def _notrack(self) -> None:
        family = 6 if ":" in self.ip else 4
        be = (await ipt.select(self.cfg)).get(family)
        if be is None:
            log.warning("node-local DNS: no iptables for IPv%d; DNS stays in conntrack", family)
            return
        res = await ipt.run([be.restore, "--noflush"], notrack_rules(self.ip, self.port))
        if res.rc != 0:
            raise UsageError(f"node-local DNS: NOTRACK rules failed: {res.err.strip()}")
        for builtin in BUILTINS:
            jump = _jump(builtin)
            if (await ipt.run([be.iptables, "-t", "raw", "-C", *jump])).rc != 0:
                res = await ipt.run([be.iptables, "-t", "raw", "-I", builtin, "1", *jump[1:]])
                if res.rc != 0:
                    raise UsageError(f"node-local DNS: jump from {builtin}: {res.err.strip()}")
        log.info("node-local DNS: raw-table NOTRACK for %s:%d (%s)", self.ip, self.port, be)

    @staticmethod
    async def cleanup() -> None:
        """--cleanup: the link (and its address) and the NOTRACK chain, every backend."""

        def unown() -> list[str]:
            owner = AddressOwner("interface", ifname=IFNAME)
            try:
                return owner.cleanup()
            finally:
                owner.close()

        released = await asyncio.to_thread(unown)
        for be in await ipt.all_backends():
            for builtin in BUILTINS:
                delete = [be.iptables, "-t", "raw", "-D", *_jump(builtin)]
                while (await ipt.run(delete)).rc == 0:
                    pass
            await ipt.run([be.iptables, "-t", "raw", "-F", CHAIN])
            await ipt.run([be.iptables, "-t", "raw", "-X", CHAIN])
        log.info("node-local DNS cleanup: released %s", ", ".join(released) or "nothing")
