"""Seamless restarts (proxy/handover.py): reuseport steering and the handover channel,
on loopback sockets of this process (no root needed)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from proxy.dns.nodelocal import notrack_rules
from proxy.handover import Handover, channel_key, reuseport, steer_to_newest, steer_to_oldest


def udp(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reuseport(s)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            s.recv(64)
        except BlockingIOError:
            return n
        n += 1


def send(port: int, n: int) -> None:
    for _ in range(n):  # a new source port each time, so the kernel's hash would spread them
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"q", ("127.0.0.1", port))


def test_steering_keeps_a_successor_idle_then_moves_everything_to_it() -> None:
    old = udp()
    port = old.getsockname()[1]
    steer_to_oldest(old)
    new = udp(port)  # joins the group: index 1
    steer_to_oldest(new)  # what every socket does after bind: no change for the group
    send(port, 40)
    assert (drain(old), drain(new)) == (40, 0)
    steer_to_newest(old)  # the old instance hands over; its socket stays open
    send(port, 40)
    assert (drain(old), drain(new)) == (0, 40)
    old.close()  # nothing queued on it: nothing lost
    send(port, 10)
    assert drain(new) == 10  # alone: index 1 is invalid, the kernel's choice is new
    steer_to_oldest(new)
    send(port, 10)
    assert drain(new) == 10
    new.close()


def test_channel_hands_over_once_the_successor_is_ready() -> None:
    async def main() -> None:
        gave: list[str] = []
        gone = asyncio.Event()

        async def give_up() -> None:
            gave.append("old")

        key = f"unit-test-{os.getpid()}"  # not a daemon's (those are their addresses)
        first = Handover(key)
        await first.connect()
        assert first.predecessor is None  # nobody serves this namespace yet
        await first.ready(give_up, lambda: None)
        other = Handover(key + "-other")  # other addresses: never a predecessor
        await other.connect()
        assert other.predecessor is None
        second = Handover(key)
        await second.connect()
        assert second.predecessor is not None
        assert not first.handed_over.is_set()  # connected, not ready: nothing moves yet
        await second.ready(give_up, gone.set)
        assert first.handed_over.is_set() and gave == ["old"]
        await first.close()
        first._held[0].close()  # the old instance exits
        await asyncio.wait_for(gone.wait(), 10)  # the new one steers to itself again
        await second.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "ip, want",
    [("169.254.20.10", "169.254.20.10/32"), ("fd00::10", "fd00::10/128")],
)
def test_notrack_rules_cover_both_protocols_and_directions(ip: str, want: str) -> None:
    text = notrack_rules(ip, 53)
    assert text.startswith("*raw\n:KUBE-PY-NODE-DNS - [0:0]\n") and text.endswith("COMMIT\n")
    rules = [line for line in text.splitlines() if line.startswith("-A")]
    assert rules == [
        f"-A KUBE-PY-NODE-DNS -d {want} -p udp -m udp --dport 53 -j NOTRACK",
        f"-A KUBE-PY-NODE-DNS -s {want} -p udp -m udp --sport 53 -j NOTRACK",
        f"-A KUBE-PY-NODE-DNS -d {want} -p tcp -m tcp --dport 53 -j NOTRACK",
        f"-A KUBE-PY-NODE-DNS -s {want} -p tcp -m tcp --sport 53 -j NOTRACK",
    ]


def test_channel_key_is_the_addresses_and_none_for_kernel_chosen_ports() -> None:
    assert channel_key(("0.0.0.0", 10256), None, ("169.254.20.10", 53)) == (
        "0.0.0.0:10256,-,169.254.20.10:53"
    )
    assert channel_key(("127.0.0.1", 0), None) is None
