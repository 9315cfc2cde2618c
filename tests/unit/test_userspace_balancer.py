"""The userspace balancer: round robin, ClientIP affinity, passive health (pure, time injected)."""

from __future__ import annotations

from collections import Counter

from proxy.model import Endpoint
from proxy.userspace.balancer import Balancer, HealthPolicy, ep_key

A, B, C = (Endpoint(f"198.18.1.{i}", 8080) for i in (1, 2, 3))


def picks(bal: Balancer, n: int, client: str = "198.18.9.1", now: float = 0.0) -> list[Endpoint]:
    return [bal.pick(client, now) for _ in range(n)]


def test_round_robin_spreads_evenly_over_all_endpoints():
    bal = Balancer([A, B, C])
    got = Counter(picks(bal, 300))
    assert got == {A: 100, B: 100, C: 100}


def test_no_endpoints_gives_none():
    assert Balancer([]).pick("1.2.3.4", 0.0) is None


def test_update_removes_endpoint_from_new_picks_at_once():
    bal = Balancer([A, B, C])
    picks(bal, 2)
    assert bal.update([A, C]) is True
    assert set(picks(bal, 20)) == {A, C}
    assert bal.update([A, C]) is False  # same set: no change


def test_update_with_new_endpoint_includes_it():
    bal = Balancer([A])
    bal.update([A, B])
    assert set(picks(bal, 4)) == {A, B}


def test_exclude_skips_tried_endpoints_and_none_when_all_tried():
    bal = Balancer([A, B])
    first = bal.pick("c", 0.0)
    second = bal.pick("c", 0.0, exclude={ep_key(first)})
    assert second is not None and second != first
    assert bal.pick("c", 0.0, exclude={ep_key(A), ep_key(B)}) is None


def test_affinity_sticks_to_one_endpoint_per_client_until_timeout():
    bal = Balancer([A, B, C], affinity_timeout=10)
    one = picks(bal, 10, client="198.18.9.1", now=0.0)
    two = picks(bal, 10, client="198.18.9.2", now=0.0)
    assert len(set(one)) == 1 and len(set(two)) == 1
    assert one[0] != two[0]  # round robin still spreads the clients
    # Each pick refreshes the entry; after `timeout` without a pick it is gone.
    assert bal.affinity_of("198.18.9.1", 9.0) == ep_key(one[0])
    assert bal.affinity_of("198.18.9.1", 10.5) is None


def test_affinity_expiry_lets_client_move_on():
    bal = Balancer([A, B], affinity_timeout=5)
    first = bal.pick("c1", 0.0)
    bal.pick("c2", 0.0)  # advances round robin
    later = bal.pick("c1", 6.0)  # expired: a fresh round-robin choice
    assert later is not None
    assert bal.affinity_of("c1", 6.0) == ep_key(later)
    assert first in (A, B)


def test_affinity_to_removed_endpoint_is_forgotten():
    bal = Balancer([A, B], affinity_timeout=100)
    ep = bal.pick("c", 0.0)
    bal.update([e for e in (A, B) if e != ep])
    assert bal.affinity_of("c", 1.0) is None
    assert bal.pick("c", 1.0) != ep


def test_affinity_table_is_bounded():
    bal = Balancer([A, B], affinity_timeout=100, affinity_max=50)
    for i in range(500):
        bal.pick(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert bal.affinity_size <= 50
    assert bal.affinity_of("10.0.1.243", 0.0) is not None  # most recent kept


def test_expire_drops_only_old_entries():
    bal = Balancer([A, B], affinity_timeout=10)
    bal.pick("old", 0.0)
    bal.pick("new", 8.0)
    assert bal.expire(12.0) == 1
    assert bal.affinity_size == 1


def test_turning_affinity_off_clears_table():
    bal = Balancer([A, B], affinity_timeout=10)
    bal.pick("c", 0.0)
    bal.update([A, B], affinity_timeout=0)
    assert bal.affinity_size == 0


def test_failed_endpoint_is_skipped_for_backoff_then_probed_again():
    bal = Balancer([A, B, C], policy=HealthPolicy(threshold=1, base=1.0, cap=30.0))
    assert bal.failed(B, now=0.0) == 1.0
    assert B not in picks(bal, 30, now=0.5)
    assert bal.backed_off(0.5) == [B]
    assert B in picks(bal, 3, now=1.5)  # backoff over: tried again


def test_backoff_doubles_while_failing_and_is_capped():
    bal = Balancer([A, B], policy=HealthPolicy(threshold=1, base=1.0, cap=8.0))
    waits = [bal.failed(A, now=float(i)) for i in range(6)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_threshold_tolerates_isolated_failures():
    bal = Balancer([A, B], policy=HealthPolicy(threshold=3))
    assert bal.failed(A, 0.0) == 0.0
    assert bal.failed(A, 0.0) == 0.0
    assert A in picks(bal, 4)
    assert bal.failed(A, 0.0) > 0
    assert A not in picks(bal, 4)


def test_success_resets_health():
    bal = Balancer([A, B])
    bal.failed(A, 0.0)
    bal.failed(A, 1.0)
    assert bal.succeeded(A) is True
    assert bal.failures(A) == 0
    assert bal.succeeded(A) is False
    assert A in picks(bal, 2, now=1.1)


def test_all_backed_off_still_tries_the_one_recovering_first():
    bal = Balancer([A, B])
    bal.failed(A, 0.0)  # until 1.0
    bal.failed(B, 0.0)
    bal.failed(B, 0.1)  # until 2.1
    assert bal.pick("c", 0.5) == A
    assert bal.pick("c", 0.5, exclude={ep_key(A)}) == B


def test_affinity_breaks_when_its_endpoint_is_backed_off():
    bal = Balancer([A, B], affinity_timeout=100)
    ep = bal.pick("c", 0.0)
    bal.failed(ep, 0.0)
    other = bal.pick("c", 0.1)
    assert other != ep
    assert bal.affinity_of("c", 0.2) == ep_key(other)


def test_health_of_removed_endpoint_is_dropped():
    bal = Balancer([A, B])
    bal.failed(A, 0.0)
    bal.update([B])
    bal.update([A, B])  # A back (a new pod with the same address): healthy
    assert bal.failures(A) == 0
    assert A in picks(bal, 2, now=0.1)


def test_failure_of_unknown_endpoint_is_ignored():
    bal = Balancer([A])
    assert bal.failed(B, 0.0) == 0.0
    assert bal.backed_off(0.0) == []
