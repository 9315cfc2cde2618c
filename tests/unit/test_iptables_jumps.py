"""missing_chain_jumps: the one restore that makes missing jump targets and their jumps."""

from proxy.iptables.applier import missing_chain_jumps
from proxy.iptables.render import BASE_JUMPS


def test_fresh_node_gets_every_chain_once_and_every_jump_in_order() -> None:
    text, inserted = missing_chain_jumps(list(BASE_JUMPS), set())
    assert len(inserted) == len(BASE_JUMPS)
    for table in {t for t, *_ in BASE_JUMPS}:
        block = text.split(f"*{table}\n", 1)[1].split("COMMIT\n", 1)[0].splitlines()
        decls = [ln for ln in block if ln.startswith(":")]
        targets = {c for t, _, c, _ in BASE_JUMPS if t == table}
        assert sorted(d.split()[0][1:] for d in decls) == sorted(targets)  # each once
        inserts = [ln for ln in block if ln.startswith("-I ")]
        want = [(b, c) for t, b, c, _ in BASE_JUMPS if t == table]
        assert [(ln.split()[1], ln.split()[-1]) for ln in inserts] == want  # kube-proxy's order
        assert block.index(decls[-1]) < block.index(inserts[0])  # chains before jumps to them
    assert '--comment "kubernetes service portals"' in text  # quoted for the restore parser


def test_jumps_to_existing_chains_are_left_to_the_check() -> None:
    existing = {(t, c) for t, _, c, _ in BASE_JUMPS}
    assert missing_chain_jumps(list(BASE_JUMPS), existing) == ("", [])
    one = next(j for j in BASE_JUMPS if j[0] == "nat")
    text, inserted = missing_chain_jumps(list(BASE_JUMPS), existing - {(one[0], one[2])})
    assert inserted and all(label.endswith(f"→ {one[2]}") for label in inserted)
    assert text.startswith(f"*nat\n:{one[2]} - [0:0]\n")
