"""Pure parts of the applier: failure location, iptables-save parsing, cleanup input."""

from __future__ import annotations

from dataclasses import replace

from proxy.iptables.applier import (
    cleanup_text,
    jump_spec,
    locate_failure,
    parse_save,
    references,
    rewritten_chains,
)

INPUT = """*filter
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
-A KUBE-SERVICES -d 198.19.0.1/32 -p tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j NOSUCHTARGET
COMMIT
"""


def test_legacy_failure_names_table_chain_and_rule() -> None:
    stderr = (
        "iptables-restore v1.8.9 (legacy): Couldn't load target `NOSUCHTARGET':"
        "No such file or directory\n\nError occurred at line: 9\n"
        "Try `iptables-restore -h' or 'iptables-restore --help' for more information.\n"
    )
    f = locate_failure(INPUT, stderr)
    assert (f.line, f.table, f.chain) == (9, "nat", "KUBE-SVC-AAAAAAAAAAAAAAAA")
    assert f.rule == "-A KUBE-SVC-AAAAAAAAAAAAAAAA -j NOSUCHTARGET"
    assert f.reason.startswith("Couldn't load target `NOSUCHTARGET'")
    text = f.describe()
    assert "table nat" in text and "chain KUBE-SVC-AAAAAAAAAAAAAAAA" in text
    assert "\n" not in text


def test_nft_failure_at_commit_is_traced_to_the_rule_naming_the_culprit() -> None:
    # iptables-nft reports the COMMIT line of the table whose transaction failed.
    stderr = (
        "iptables-nft-restore v1.8.9 (nf_tables): Chain 'NOSUCHTARGET' does not exist\n"
        "Error occurred at line: 10\n"
        "Try `iptables-nft-restore -h' or 'iptables-nft-restore --help' for more information.\n"
    )
    f = locate_failure(INPUT, stderr)
    assert f.table == "nat"
    assert f.chain == "KUBE-SVC-AAAAAAAAAAAAAAAA"
    assert "NOSUCHTARGET" in f.rule
    assert f.reason == "Chain 'NOSUCHTARGET' does not exist"


def test_line_n_failed_form() -> None:
    f = locate_failure(INPUT, "iptables-restore: line 3 failed\n")
    assert (f.line, f.table, f.chain) == (3, "filter", "KUBE-SERVICES")


# Real outputs of iptables 1.8.9 (Debian 12), recorded in a network namespace where a rule
# outside the product (-A FOREIGN -j KUBE-SVC-AAAAAAAAAAAAAAAA) holds the chain being deleted.
BUSY = """*filter
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 198.19.0.2/32 -j ACCEPT
-X KUBE-SVC-AAAAAAAAAAAAAAAA
COMMIT
"""
NFT_BUSY = (
    "iptables-nft-restore v1.8.9 (nf_tables): \n"
    "line 8: CHAIN_DEL failed (Device or resource busy): chain KUBE-SVC-AAAAAAAAAAAAAAAA\n"
)
LEGACY_BUSY = "iptables-restore: line 8 failed\n"


def test_nft_transaction_error_names_the_line_the_chain_and_the_rule() -> None:
    """Bug 7: this used to read "iptables-restore failed (unknown place): iptables-nft-
    restore v1.8.9 (nf_tables):"."""
    f = locate_failure(BUSY, NFT_BUSY)
    assert (f.line, f.table, f.chain) == (8, "nat", "KUBE-SVC-AAAAAAAAAAAAAAAA")
    assert f.rule == "-X KUBE-SVC-AAAAAAAAAAAAAAAA"
    assert f.reason == "CHAIN_DEL failed (Device or resource busy)"
    assert f.describe() == (
        "iptables-restore failed (table nat, chain KUBE-SVC-AAAAAAAAAAAAAAAA, line 8): "
        "CHAIN_DEL failed (Device or resource busy) [rule: -X KUBE-SVC-AAAAAAAAAAAAAAAA]"
    )


def test_legacy_line_failed_names_the_line_the_chain_and_the_rule() -> None:
    f = locate_failure(BUSY, LEGACY_BUSY)
    assert (f.line, f.table, f.chain) == (8, "nat", "KUBE-SVC-AAAAAAAAAAAAAAAA")
    assert f.rule == "-X KUBE-SVC-AAAAAAAAAAAAAAAA" and f.reason == ""


def test_nft_rule_errors_name_the_chain_of_the_rule() -> None:
    stderr = (
        "iptables-nft-restore v1.8.9 (nf_tables): \n"
        "line 3: RULE_APPEND failed (No such file or directory): rule in chain KUBE-SERVICES\n"
    )
    f = locate_failure(BUSY, stderr)
    assert (f.line, f.table, f.chain) == (3, "filter", "KUBE-SERVICES")
    assert f.rule == "-A KUBE-SERVICES -j ACCEPT"
    assert f.reason == "RULE_APPEND failed (No such file or directory)"


def test_nft_line_failed_with_a_reason() -> None:
    stderr = "iptables-nft-restore: line 8 failed: No chain/target/match by that name.\n"
    f = locate_failure(BUSY, stderr)
    assert (f.line, f.chain) == (8, "KUBE-SVC-AAAAAAAAAAAAAAAA")
    assert f.reason == "No chain/target/match by that name."


def test_parser_errors_drop_the_program_prefixes() -> None:
    stderr = (
        "iptables-nft-restore v1.8.9 (nf_tables): iptables-nft-restore: line 1 table name "
        "'nosuchtable' invalid\nError occurred at line: 1\n"
        "Try `iptables-nft-restore -h' or 'iptables-nft-restore --help' for more information.\n"
    )
    f = locate_failure("*nosuchtable\n:X - [0:0]\nCOMMIT\n", stderr)
    assert f.line == 1 and f.reason == "line 1 table name 'nosuchtable' invalid"
    f = locate_failure(
        "*nat\n:KUBE-SERVICES - [0:0]\n", "iptables-restore: COMMIT expected at line 3\n"
    )
    assert f.line == 3 and f.reason == "COMMIT expected at line 3"


def test_references_and_the_description_of_a_held_chain() -> None:
    saved = parse_save(
        "*nat\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:FOREIGN - [0:0]\n"
        "-A FOREIGN -d 198.19.0.1/32 -j KUBE-SVC-AAAAAAAAAAAAAAAA\n"
        "-A FOREIGN -j ACCEPT\n-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SVC-AAAAAAAAAAAAAAAA\nCOMMIT\n"
    )
    refs = references(saved["nat"], "KUBE-SVC-AAAAAAAAAAAAAAAA", rewritten_chains(BUSY, "nat"))
    assert refs == ("-A FOREIGN -d 198.19.0.1/32 -j KUBE-SVC-AAAAAAAAAAAAAAAA",)
    # A jump from a chain the failed input rewrites is not what holds the chain.
    assert references(saved["nat"], "KUBE-SVC-AAAAAAAAAAAAAAAA", {"FOREIGN"}) == ()
    assert rewritten_chains(BUSY, "nat") == {"KUBE-SERVICES"}
    f = replace(locate_failure(BUSY, LEGACY_BUSY), referenced_by=refs)
    assert f.describe().endswith(
        "[rule: -X KUBE-SVC-AAAAAAAAAAAAAAAA] [still referenced by: "
        "-A FOREIGN -d 198.19.0.1/32 -j KUBE-SVC-AAAAAAAAAAAAAAAA]"
    )
    many = replace(f, referenced_by=tuple(f"-A F{i} -j X" for i in range(5)))
    assert many.describe().endswith("-A F2 -j X and 2 more]")


def test_unparseable_error_keeps_the_message() -> None:
    f = locate_failure(INPUT, "iptables-restore: unable to initialize table 'nat'\n")
    assert f.line == 0
    assert "unable to initialize table" in f.describe()


SAVED = """# Generated by iptables-nft-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-ROUTER-INPUT - [0:0]
:MY-CHAIN - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -j KUBE-ROUTER-INPUT
-A INPUT -p tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A MY-CHAIN -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 198.19.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB
COMMIT
"""  # noqa: E501


def test_parse_save() -> None:
    t = parse_save(SAVED)
    assert set(t) == {"mangle", "filter", "nat"}
    assert t["filter"].chains["FORWARD"] == "DROP"
    assert ("PREROUTING", t["nat"].rules[0][1]) == t["nat"].rules[0]
    assert len(t["nat"].rules) == 4


def test_cleanup_text_removes_our_chains_and_jumps_only() -> None:
    out = cleanup_text(parse_save(SAVED))
    nat = out["nat"].splitlines()
    assert nat[0] == "*nat" and nat[-1] == "COMMIT"
    assert '-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat
    assert '-D OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat
    for chain in ("KUBE-SERVICES", "KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB"):
        # flushed before any deletion, so references between them do not block -X
        assert nat.index(f":{chain} - [0:0]") < min(i for i, x in enumerate(nat) if x[:2] == "-X")
        assert f"-X {chain}" in nat
    # rules inside doomed chains are not deleted one by one (the flush does it)
    assert not any(x.startswith("-D KUBE-") for x in nat)

    flt = out["filter"].splitlines()
    assert "-X KUBE-EXTERNAL-SERVICES" in flt and "-X KUBE-FORWARD" in flt
    assert "-D MY-CHAIN -j KUBE-FORWARD" in flt  # a foreign chain's jump to ours goes
    # No kubelet on this backend: KUBE-FIREWALL (localhost NodePorts) was ours, it goes
    # with its jump; other software's KUBE-* chains stay.
    assert "-X KUBE-FIREWALL" in flt and "-D INPUT -j KUBE-FIREWALL" in flt
    assert not any("KUBE-ROUTER" in x for x in flt)
    assert not any("MY-CHAIN" in x and x.startswith((":", "-X")) for x in flt)
    assert not any("--dport 22" in x for x in flt)

    # no kubelet canary: our hint chain goes too, with the canary
    assert out["mangle"].splitlines()[1:] == [
        ":KUBE-IPTABLES-HINT - [0:0]",
        ":KUBE-PROXY-CANARY - [0:0]",
        "-X KUBE-IPTABLES-HINT",
        "-X KUBE-PROXY-CANARY",
        "COMMIT",
    ]


def test_cleanup_keeps_kubelets_chains_when_kubelet_uses_this_backend() -> None:
    saved = SAVED.replace(":KUBE-PROXY-CANARY", ":KUBE-KUBELET-CANARY")
    out = cleanup_text(parse_save(saved))
    assert "mangle" not in out
    assert not any("KUBE-FIREWALL" in x for x in out["filter"].splitlines())


def test_cleanup_text_is_empty_when_nothing_is_ours() -> None:
    saved = "*filter\n:INPUT ACCEPT [0:0]\n:MY-CHAIN - [0:0]\n-A INPUT -j MY-CHAIN\nCOMMIT\n"
    assert cleanup_text(parse_save(saved)) == {}


def test_jump_spec_appends_the_target_once() -> None:
    assert jump_spec("KUBE-X", ("-m", "comment", "--comment", "x")) == [
        "-m",
        "comment",
        "--comment",
        "x",
        "-j",
        "KUBE-X",
    ]
    assert jump_spec("KUBE-X", ("-j", "KUBE-X")) == ["-j", "KUBE-X"]
