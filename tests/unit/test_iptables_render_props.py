"""Properties of the iptables renderer over random models (hypothesis).

A small model of `iptables-restore --noflush` (FakeKernel) checks what the kernel would
check: chains exist before rules go in, -X only on empty, unreferenced chains, every
jump lands on a chain. Partial renders are checked by applying them on top of earlier
ones and comparing the resulting tables with a fresh full render.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from types import MappingProxyType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.iptables.render import RenderConfig, RenderResult, render
from proxy.model import (
    Endpoint,
    Model,
    PortSpec,
    Service,
    ServiceEndpoints,
    ServiceKey,
    make_model,
)
from proxy.selection import usable_endpoints

NODE = "node-a"
CFG4 = RenderConfig(family=4, node_name=NODE, cluster_cidrs=("198.18.0.0/16", "fd00:18::/64"))
CFG6 = RenderConfig(family=6, node_name=NODE, cluster_cidrs=("198.18.0.0/16", "fd00:18::/64"))
TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "MASQUERADE", "DNAT", "SNAT"}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class RestoreError(AssertionError):
    pass


class FakeKernel:
    """Tables as {table: {chain: [rule text]}}, changed the way iptables-restore would."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, list[str]]] = {"filter": {}, "nat": {}}

    def restore(self, text: str) -> None:
        if not text.endswith("COMMIT\n"):
            raise RestoreError("input does not end with COMMIT")
        table = None
        work: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
                work = copy.deepcopy(self.tables[table])
            elif line == "COMMIT":
                for chain, rules in work.items():
                    for rule in rules:
                        m = re.search(r" -[jg] (\S+)", rule)
                        if m and m.group(1) not in TARGETS and m.group(1) not in work:
                            raise RestoreError(f"{chain}: jump to missing chain {m.group(1)}")
                assert table is not None
                self.tables[table] = work
                table = None
            elif line.startswith(":"):
                work[line[1:].split(" ")[0]] = []  # create, or flush
            elif line.startswith("-A "):
                chain, rule = line[3:].split(" ", 1)
                if chain not in work:
                    raise RestoreError(f"-A to missing chain {chain}")
                work[chain].append(rule)
            elif line.startswith("-X "):
                chain = line[3:]
                if chain not in work or work[chain]:
                    raise RestoreError(f"-X {chain}: missing or not empty")
                if any(re.search(rf" -[jg] {chain}$", r) for rs in work.values() for r in rs):
                    raise RestoreError(f"-X {chain}: still referenced")
                del work[chain]
            else:
                raise RestoreError(f"unexpected line {line!r}")


# -- random models ----------------------------------------------------------------------

names_st = st.sampled_from(["a", "b", "c", "d", "e"])


@st.composite
def endpoints_st(draw, port_name: str, proto: str) -> tuple[Endpoint, ...]:
    out = {}
    for _ in range(draw(st.integers(0, 6))):
        v6 = draw(st.booleans()) and draw(st.booleans())
        n = draw(st.integers(1, 40))
        ip = f"fd00:18::{n:x}" if v6 else f"198.18.{n // 10}.{n}"
        ready = draw(st.booleans()) or draw(st.booleans())
        terminating = not ready and draw(st.booleans())
        serving = ready or (terminating and draw(st.booleans()))
        node = draw(st.sampled_from([NODE, "node-b"]))
        out[(ip, 8080)] = Endpoint(ip, 8080, ready, serving, terminating, node)
    return tuple(out[k] for k in sorted(out))


@st.composite
def service_st(draw, name: str) -> tuple[Service, ServiceEndpoints]:
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    idx = "abcde".index(name) + 1
    cips = (f"198.19.0.{idx}",) + ((f"fd00:19::{idx}",) if draw(st.booleans()) else ())
    ports = []
    eps = {}
    for i, proto in enumerate(
        draw(st.lists(st.sampled_from(["TCP", "UDP", "SCTP"]), min_size=1, max_size=2, unique=True))
    ):
        pname = draw(st.sampled_from(["", "p"])) + str(i) if i else draw(st.sampled_from(["", "p"]))
        node_port = 30000 + idx * 10 + i if kind != "ClusterIP" else 0
        ports.append(PortSpec(pname, proto, 80 + i, node_port))
        eps[(pname, proto)] = draw(endpoints_st(pname, proto))
    external = draw(st.sampled_from([(), (f"198.19.100.{idx}",), (f"fd00:19::10{idx}",)]))
    lb = (f"198.19.200.{idx}", f"fd00:19::20{idx}") if kind == "LoadBalancer" else ()
    ranges = draw(st.sampled_from([(), ("203.0.113.0/25",), ("203.0.113.0/25", "fd00::/8")]))
    etp = kind != "ClusterIP" and draw(st.booleans())
    svc = Service(
        "ns1",
        name,
        type=kind,
        cluster_ips=cips,
        ports=tuple(ports),
        external_ips=external,
        load_balancer_ips=lb,
        load_balancer_source_ranges=ranges if lb else (),
        session_affinity_timeout=draw(st.sampled_from([0, 0, 300])),
        external_traffic_local=etp,
        internal_traffic_local=draw(st.booleans()) and draw(st.booleans()),
        health_check_node_port=32000 + idx if etp and kind == "LoadBalancer" else 0,
    )
    return svc, ServiceEndpoints((), MappingProxyType(eps))


@st.composite
def model_st(draw) -> Model:
    services, endpoints = {}, {}
    for name in draw(st.lists(names_st, max_size=5, unique=True)):
        svc, eps = draw(service_st(name))
        services[svc.key] = svc
        endpoints[svc.key] = eps
    return make_model(services, endpoints)


@st.composite
def model_pair_st(draw) -> tuple[Model, Model, frozenset[ServiceKey]]:
    """A model, a successor with some Services added, removed or changed, and the keys."""
    m0 = draw(model_st())
    services, endpoints = dict(m0.services), dict(m0.endpoints)
    changed = set()
    for name in draw(st.lists(names_st, max_size=3, unique=True)):
        key = ("ns1", name)
        changed.add(key)
        action = draw(st.sampled_from(["delete", "redraw", "tweak"]))
        if key in services and action == "delete":
            del services[key]
            endpoints.pop(key, None)
        elif key in services and action == "tweak":
            # Same endpoints (so the same chain names), different rules.
            svc = services[key]
            services[key] = dataclasses.replace(
                svc,
                session_affinity_timeout=draw(st.sampled_from([0, 60, 10800])),
                load_balancer_source_ranges=draw(
                    st.sampled_from([(), ("203.0.113.0/25",), ("203.0.113.0/26", "::/0")])
                )
                if svc.load_balancer_ips
                else (),
                external_ips=draw(st.sampled_from([(), ("198.19.100.9",), svc.external_ips])),
            )
        else:
            svc, eps = draw(service_st(name))
            services[key], endpoints[key] = svc, eps
    return m0, make_model(services, endpoints), frozenset(changed)


# -- helpers ----------------------------------------------------------------------------


def kernel_after(*results: RenderResult) -> FakeKernel:
    k = FakeKernel()
    for r in results:
        k.restore(r.text)
    return k


def owned_in_kernel(k: FakeKernel) -> set[tuple[str, str]]:
    return {(t, c) for t, chains in k.tables.items() for c in chains}


def family_ok(ip: str, cfg: RenderConfig) -> bool:
    return (":" in ip) == (cfg.family == 6)


def effective_probabilities(rules: list[str]) -> list[float]:
    """P(each dispatch rule is the one taken), from the rules' order and probabilities."""
    remaining, out = 1.0, []
    for r in rules:
        m = re.search(r"--probability (\S+)", r)
        p = float(m.group(1)) if m else 1.0
        out.append(remaining * p)
        remaining *= 1 - p
    return out


# -- properties -------------------------------------------------------------------------


@SETTINGS
@given(model_st(), st.sampled_from([CFG4, CFG6]))
def test_full_render_is_accepted_and_complete(model: Model, cfg: RenderConfig) -> None:
    res = render(model, cfg)
    k = kernel_after(res)  # every jump lands on a declared chain
    nat, filt = k.tables["nat"], k.tables["filter"]
    assert owned_in_kernel(k) == set(res.state.chains)
    for svc in model.services.values():
        cip = next((ip for ip in svc.cluster_ips if family_ok(ip, cfg)), None)
        if cip is None:
            continue
        for port in svc.ports:
            spn, proto = svc.port_name_string(port), port.protocol.lower()
            eps = [e for e in model.endpoints_for(svc, port) if family_ok(e.ip, cfg)]
            usable = usable_endpoints(tuple(eps), NODE, local_only=False)
            frontend = f"-m {proto} -p {proto} -d {cip} --dport {port.port} -j "
            if not usable:
                assert any(frontend + "REJECT" in r for r in filt["KUBE-SERVICES"])
                continue
            jumps = [r for r in nat["KUBE-SERVICES"] if frontend in r]
            local = usable_endpoints(tuple(eps), NODE, local_only=True)
            if svc.internal_traffic_local and not local:
                assert not jumps  # dropped in filter instead
                assert any(frontend + "DROP" in r for r in filt["KUBE-SERVICES"])
                continue
            assert len(jumps) == 1, spn
            target = jumps[0].rsplit(" ", 1)[1]
            assert target.startswith("KUBE-SVL-" if svc.internal_traffic_local else "KUBE-SVC-")
            externally = port.node_port or any(
                family_ok(ip, cfg) for ip in svc.external_ips + svc.load_balancer_ips
            )
            if not svc.internal_traffic_local or externally:
                # every proxied port with endpoints has its KUBE-SVC chain
                assert any(c.startswith("KUBE-SVC-") and c[9:] == target[9:] for c in nat)


@SETTINGS
@given(model_st(), st.sampled_from([CFG4, CFG6]))
def test_probabilities_split_uniformly(model: Model, cfg: RenderConfig) -> None:
    nat = kernel_after(render(model, cfg)).tables["nat"]
    for chain, rules in nat.items():
        if not chain.startswith(("KUBE-SVC-", "KUBE-SVL-")):
            continue
        dispatch = [r for r in rules if "KUBE-SEP-" in r and "--rcheck" not in r]
        n = len(dispatch)
        assert n >= 1
        assert "--probability" not in dispatch[-1]  # the last one always matches
        for p in effective_probabilities(dispatch):
            assert abs(p - 1 / n) < 1e-9
        targets = [r.rsplit(" ", 1)[1] for r in dispatch]
        assert len(set(targets)) == n  # each endpoint once


@SETTINGS
@given(model_pair_st(), st.sampled_from([CFG4, CFG6]))
def test_partial_render_equals_full_render(
    pair: tuple[Model, Model, frozenset[ServiceKey]], cfg: RenderConfig
) -> None:
    m0, m1, changed = pair
    first = render(m0, cfg)
    partial = render(m1, cfg, changed=changed, previous=first.state)
    assert not partial.full
    k = kernel_after(first, partial)  # accepted on top of the first (jumps all resolve)
    assert k.tables == kernel_after(render(m1, cfg)).tables
    assert owned_in_kernel(k) == set(partial.state.chains)
    assert partial.rules["nat"] == sum(len(r) for r in k.tables["nat"].values())
    assert partial.rules["filter"] == sum(len(r) for r in k.tables["filter"].values())

    # Only changed Services' chains are mentioned, and only chains owned or declared are
    # jumped to.
    theirs = set()
    for key in changed:
        theirs |= {c for _, c in first.state.service_chains.get(key, ())}
        theirs |= {c for _, c in partial.state.service_chains.get(key, ())}
    declared = set(re.findall(r"^:(KUBE-(?:SVC|SVL|EXT|FW|SEP)-\S+)", partial.text, re.M))
    assert declared <= theirs
    known = {c for _, c in first.state.chains} | set(re.findall(r"^:(\S+)", partial.text, re.M))
    for target in re.findall(r" -[jg] (\S+)", partial.text):
        assert target in TARGETS or target in known


@SETTINGS
@given(model_pair_st(), st.sampled_from([CFG4, CFG6]))
def test_full_render_removes_stale_chains(
    pair: tuple[Model, Model, frozenset[ServiceKey]], cfg: RenderConfig
) -> None:
    m0, m1, _ = pair
    first = render(m0, cfg)
    second = render(m1, cfg, previous=first.state)
    assert second.full
    fresh = render(m1, cfg)
    assert second.text.replace("\n", "").count("-X ") == len(
        first.state.chains - fresh.state.chains
    )
    k = kernel_after(first, second)
    assert k.tables == kernel_after(fresh).tables  # nothing stale left behind
    # Reusing the previous render's fragments changes nothing but the deletions.
    keep = [ln for ln in second.text.splitlines() if not ln.startswith("-X ")]
    stale = {c for _, c in first.state.chains - fresh.state.chains}
    keep = [ln for ln in keep if ln[1:].split(" ")[0] not in stale]
    assert "\n".join(keep) + "\n" == fresh.text


@SETTINGS
@given(st.lists(model_pair_st(), min_size=1, max_size=4), st.sampled_from([CFG4, CFG6]))
def test_chain_of_partial_renders(pairs, cfg: RenderConfig) -> None:
    """Several partial syncs in a row stay equivalent to a full render."""
    model = pairs[0][0]
    res = render(model, cfg)
    k = kernel_after(res)
    for _, m1, changed in pairs:
        # `changed` is relative to the pair's own m0; include every key that differs.
        diff = {
            key
            for key in set(model.services) | set(m1.services)
            if model.services.get(key) != m1.services.get(key)
            or model.endpoints.get(key) != m1.endpoints.get(key)
        }
        res = render(m1, cfg, changed=frozenset(diff) | changed, previous=res.state)
        k.restore(res.text)
        model = m1
    assert k.tables == kernel_after(render(model, cfg)).tables


def _apply_all(k: FakeKernel, r: RenderResult) -> None:
    for part in r.pre:
        k.restore(part)  # each chunk alone must be accepted (consistent on its own)
    k.restore(r.text)


@SETTINGS
@given(model_pair_st(), st.sampled_from([CFG4, CFG6]), st.integers(1, 6))
def test_chunked_render_equals_single_transaction(
    pair: tuple[Model, Model, frozenset[ServiceKey]], cfg: RenderConfig, chunk: int
) -> None:
    """render(chunk_chains=N) (the nft path) ends in exactly the same tables as one
    transaction, for a first full sync, a partial sync and a full resync on top."""
    m0, m1, changed = pair
    single0 = render(m0, cfg)
    chunked0 = render(m0, cfg, chunk_chains=chunk)
    k = FakeKernel()
    _apply_all(k, chunked0)
    assert k.tables == kernel_after(single0).tables
    assert chunked0.rules == single0.rules

    part = render(m1, cfg, changed=changed, previous=chunked0.state, chunk_chains=chunk)
    _apply_all(k, part)
    assert k.tables == kernel_after(render(m1, cfg)).tables
    full = render(m1, cfg, previous=part.state, chunk_chains=chunk)
    _apply_all(k, full)
    assert k.tables == kernel_after(render(m1, cfg)).tables
    assert owned_in_kernel(k) == set(full.state.chains)


def test_chunking_splits_whole_services() -> None:
    """Many Services, a small chunk size: several pre-restores, none splitting a Service."""
    from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
    from tests.unit.factories import endpoint, service, slice_

    store = Store()
    store.replace(SERVICE, [service(f"s{i}", ip=f"198.19.0.{i + 1}") for i in range(20)])
    store.replace(
        ENDPOINT_SLICE,
        [
            slice_(
                f"s{i}", endpoints=[endpoint(f"198.18.0.{i + 1}"), endpoint(f"198.18.1.{i + 1}")]
            )
            for i in range(20)
        ],
    )
    model = store.snapshot().model
    r = render(model, CFG4, chunk_chains=6)
    assert len(r.pre) >= 5
    for part in r.pre:
        svc_chains = set(re.findall(r"^:(KUBE-SVC-\S+)", part, re.M))
        sep_chains = set(re.findall(r"^:(KUBE-SEP-\S+)", part, re.M))
        assert len(sep_chains) == 2 * len(svc_chains)  # each Service with all its SEPs
        assert "KUBE-SERVICES" not in part  # the top level only in the final text
    k = FakeKernel()
    _apply_all(k, r)
    assert k.tables == kernel_after(render(model, CFG4)).tables


@SETTINGS
@given(model_pair_st(), st.sampled_from([CFG4, CFG6]))
def test_state_without_text_still_renders_exactly(
    pair: tuple[Model, Model, frozenset[ServiceKey]], cfg: RenderConfig
) -> None:
    """Large rulesets keep no chain text in the state; partial and full renders on such
    a state must still end in exactly the tables of a fresh full render."""
    import proxy.iptables.render as render_mod

    m0, m1, changed = pair
    saved = render_mod.TEXT_CACHE_MAX_RULES
    render_mod.TEXT_CACHE_MAX_RULES = 0
    try:
        first = render(m0, cfg)
        assert all(not f.decl for f in first.state.fragments.values())
        k = kernel_after(first)
        part = render(m1, cfg, changed=changed, previous=first.state)
        k.restore(part.text)
        full = render(m1, cfg, previous=part.state)
        k.restore(full.text)
    finally:
        render_mod.TEXT_CACHE_MAX_RULES = saved
    expected = kernel_after(render(m1, cfg)).tables
    assert k.tables == expected
    assert full.rules == render(m1, cfg).rules


@SETTINGS
@given(
    model_st(),
    st.sampled_from([CFG4, CFG6]),
    st.sampled_from(["", "198.18.200.1", "203.0.113.9", "fd00::9"]),  # in the ranges or not
    st.booleans(),
    st.booleans(),
)
def test_rule_count_from_the_plan_is_what_write_makes(
    model: Model, cfg: RenderConfig, node_ip: str, masq_all: bool, no_cidr: bool
) -> None:
    """Large renders count each Service's rules from its plan and write them later: the
    count must be exactly what write() makes, in both comment flavours."""
    from proxy.iptables.render import _Renderer

    cfg = dataclasses.replace(
        cfg,
        node_ip=node_ip,
        masquerade_all=masq_all,
        cluster_cidrs=() if no_cidr else cfg.cluster_cidrs,
    )
    r = _Renderer(cfg)
    for key, svc in model.services.items():
        f = r.plan(svc, model.endpoints.get(key))
        if f is None:
            continue
        n = r.count(f)
        for comments in (True, False):
            assert r.write(f.copy(), comments).n_rules == n


@SETTINGS
@given(model_pair_st(), st.sampled_from([CFG4, CFG6]), st.integers(1, 6))
def test_lean_chunked_render_equals_single_transaction(
    pair: tuple[Model, Model, frozenset[ServiceKey]], cfg: RenderConfig, chunk: int
) -> None:
    """Large renders (no text kept, chunks written when read) end in exactly the tables
    and rule counts of one transaction: first sync, partial sync, full resync."""
    import proxy.iptables.render as render_mod

    m0, m1, changed = pair
    saved = render_mod.TEXT_CACHE_MAX_RULES
    render_mod.TEXT_CACHE_MAX_RULES = 0
    try:
        k = FakeKernel()
        first = render(m0, cfg, chunk_chains=chunk)
        _apply_all(k, first)
        _apply_all(k, first)  # chunks read twice give the same text
        part = render(m1, cfg, changed=changed, previous=first.state, chunk_chains=chunk)
        _apply_all(k, part)
        full = render(m1, cfg, previous=part.state, chunk_chains=chunk)
        _apply_all(k, full)
    finally:
        render_mod.TEXT_CACHE_MAX_RULES = saved
    single0, single1 = render(m0, cfg), render(m1, cfg)
    assert first.rules == single0.rules
    assert full.rules == single1.rules
    assert k.tables == kernel_after(single1).tables
    assert owned_in_kernel(k) == set(full.state.chains)
