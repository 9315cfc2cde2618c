"""A tiny scriptable DNS server: the upstream in tests and benchmarks (not used by the daemon).

Answers every question by the first label of the name:

- `nx-…`    NXDOMAIN with an SOA (negative TTL = --ttl)
- `nodata-…` NOERROR, no answer, SOA
- `fail-…`  SERVFAIL
- `drop-…`  no reply at all (a timeout)
- `big-…`   60 A records: truncated over UDP (no EDNS / small EDNS), complete over TCP
- `spoof-…` first a reply with a wrong question, then the right one
- anything else: one A (--address) or AAAA (--address6) record with TTL --ttl

    python -m proxy.dns.stub --listen 198.18.0.53:53 [--address 192.0.2.1] [--ttl 300]

It counts questions per name (`StubServer.counts`); run as a script it prints one line
per query to stdout, so a test can see whether a name reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import socket
import sys
from collections import Counter

from dnslib import AAAA, QTYPE, RR, SOA, A, DNSLabel, DNSRecord

from proxy.config import parse_hostport


class StubServer:
    def __init__(
        self, address: str = "192.0.2.1", address6: str = "2001:db8::1", ttl: int = 300
    ) -> None:
        self.address = address
        self.address6 = address6
        self.ttl = ttl
        self.counts: Counter[str] = Counter()
        self.verbose = False
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self.port = 0
        self._clients: set[asyncio.Task] = set()

    def reply(self, data: bytes, tcp: bool) -> list[bytes]:
        try:
            q = DNSRecord.parse(data)
        except Exception:
            return []
        if q.header.qr or not q.questions:
            return []
        name = str(q.q.qname).lower()
        self.counts[name] += 1
        if self.verbose:
            print(f"query {name} {QTYPE.get(q.q.qtype, q.q.qtype)}", flush=True)
        first = name.split(".", 1)[0]
        r = q.reply()
        r.header.aa = 0
        soa = RR(
            DNSLabel(name.split(".", 1)[1] or "."),
            QTYPE.SOA,
            rdata=SOA("ns.stub.", "admin.stub.", (1, 3600, 600, 86400, self.ttl)),
            ttl=self.ttl,
        )
        if first.startswith("drop-"):
            return []
        if first.startswith("fail-"):
            r.header.rcode = 2
        elif first.startswith("nx-"):
            r.header.rcode = 3
            r.add_auth(soa)
        elif first.startswith("nodata-"):
            r.add_auth(soa)
        elif first.startswith("big-") and q.q.qtype == QTYPE.A:
            edns = [rr for rr in q.ar if rr.rtype == QTYPE.OPT]
            size = edns[0].rclass if edns else 512
            if not tcp and size < 2048:
                r.header.tc = 1
            else:
                for i in range(60):
                    r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(f"192.0.2.{i + 1}"), ttl=self.ttl))
        elif q.q.qtype == QTYPE.A:
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(self.address), ttl=self.ttl))
        elif q.q.qtype == QTYPE.AAAA:
            r.add_answer(RR(q.q.qname, QTYPE.AAAA, rdata=AAAA(self.address6), ttl=self.ttl))
        else:
            r.add_auth(soa)
        out = bytes(r.pack())
        if first.startswith("spoof-"):
            bad = DNSRecord.parse(out)
            bad.questions[0].qname = DNSLabel("evil.example.")
            bad.rr = [RR("evil.example.", QTYPE.A, rdata=A("203.0.113.66"), ttl=self.ttl)]
            return [bytes(bad.pack()), out]
        return [out]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        stub = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr) -> None:
                for out in stub.reply(data, False):
                    self.t.sendto(out, addr)

        async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._clients.add(task)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                while True:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                    for out in stub.reply(await reader.readexactly(n), True):
                        writer.write(len(out).to_bytes(2, "big") + out)
            writer.close()
            self._clients.discard(task)

        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(10):  # port 0: UDP picks one, TCP must get the same
            self._udp, _ = await loop.create_datagram_endpoint(
                Udp, local_addr=(host, port), family=fam
            )
            self.port = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(
                    tcp_client, host, self.port, reuse_address=True
                )
                break
            except OSError as e:
                self._udp.close()
                if port or e.errno != errno.EADDRINUSE or attempt == 9:
                    raise
        return self.port

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._clients):
            t.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=1)


async def _main(args: argparse.Namespace) -> None:
    hp = parse_hostport(args.listen, "--listen")
    assert hp is not None
    host, port = hp
    stub = StubServer(args.address, args.address6, args.ttl)
    stub.verbose = not args.quiet
    await stub.start(host, port)
    print(f"stub DNS listening on {args.listen}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--address", default="192.0.2.1")
    p.add_argument("--address6", default="2001:db8::1")
    p.add_argument("--ttl", type=int, default=300)
    p.add_argument("--quiet", action="store_true", help="do not print each query")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
