"""A model of what the kernel does with the nftables renderer's transactions.

It understands exactly the commands the renderer writes (a `table … { … }` block and
`add/flush/delete` of chains, rules, sets and elements) and checks what nft and the
kernel would refuse: an element added twice with another value, a delete of something
absent, a chain deleted while non-empty or referenced, a jump or `@set` to something not
declared. A transaction that fails leaves the state unchanged (nft transactions are atomic).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field


class Refused(AssertionError):
    pass


@dataclass
class Table:
    maps: dict[str, dict[str, str]] = field(default_factory=dict)  # name → key → value
    chains: dict[str, list[str]] = field(default_factory=dict)

    def refs(self) -> tuple[set[str], set[str]]:
        """(chains, maps/sets) referenced by rules and verdict elements."""
        chains, sets = set(), set()
        for rules in self.chains.values():
            for r in rules:
                chains |= set(re.findall(r"\b(?:jump|goto) ([\w./-]+)", r))
                sets |= set(re.findall(r"@([\w./-]+)", r))
        for els in self.maps.values():
            for v in els.values():
                chains |= set(re.findall(r"\b(?:jump|goto) ([\w./-]+)", v))
        return chains, sets


_ELEM = re.compile(r"^(add|delete) element (ip6?) kube-proxy (\S+) \{ (.*) \}$")


def _split_elements(body: str) -> list[str]:
    return [e.strip() for e in body.split(", ") if e.strip()]


class FakeNft:
    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}

    def run(self, text: str) -> None:
        work = copy.deepcopy(self.tables)
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if not line:
                continue
            if m := re.match(r"^add table (ip6?) kube-proxy$", line):
                work.setdefault(m.group(1), Table())
            elif m := re.match(r"^delete table (ip6?) kube-proxy$", line):
                if m.group(1) not in work:
                    raise Refused(f"no table to delete: {line}")
                del work[m.group(1)]
            elif m := re.match(r"^table (ip6?) kube-proxy \{$", line):
                t = work.setdefault(m.group(1), Table())
                i = self._block(t, lines, i)
            elif m := _ELEM.match(line):
                verb, fam, name, body = m.groups()
                els = work[fam].maps.get(name)
                if els is None:
                    raise Refused(f"no map {name}: {line[:120]}")
                for e in _split_elements(body):
                    key, _, value = e.partition(" : ")
                    if verb == "add":
                        if key in els and els[key] != value:
                            raise Refused(f"{name}: {key} exists with another value")
                        els[key] = value
                    else:
                        if key not in els:
                            raise Refused(f"{name}: delete of absent element {key}")
                        del els[key]
            elif m := re.match(r"^add set (ip6?) kube-proxy (\S+) \{.*\}$", line):
                work[m.group(1)].maps.setdefault(m.group(2), {})
            elif m := re.match(r"^delete set (ip6?) kube-proxy (\S+)$", line):
                t = work[m.group(1)]
                if m.group(2) not in t.maps:
                    raise Refused(f"delete of absent set {m.group(2)}")
                del t.maps[m.group(2)]
            elif m := re.match(r"^add chain (ip6?) kube-proxy (\S+)$", line):
                work[m.group(1)].chains.setdefault(m.group(2), [])
            elif m := re.match(r"^flush chain (ip6?) kube-proxy (\S+)$", line):
                t = work[m.group(1)]
                if m.group(2) not in t.chains:
                    raise Refused(f"flush of absent chain {m.group(2)}")
                t.chains[m.group(2)] = []
            elif m := re.match(r"^delete chain (ip6?) kube-proxy (\S+)$", line):
                t = work[m.group(1)]
                name = m.group(2)
                if t.chains.get(name):
                    raise Refused(f"delete of non-empty chain {name}")
                if name not in t.chains:
                    raise Refused(f"delete of absent chain {name}")
                del t.chains[name]
            elif m := re.match(r"^add rule (ip6?) kube-proxy (\S+) (.*)$", line):
                t = work[m.group(1)]
                if m.group(2) not in t.chains:
                    raise Refused(f"rule in absent chain {m.group(2)}")
                t.chains[m.group(2)].append(m.group(3))
            else:
                raise Refused(f"unknown command: {line[:120]}")
            # Checked after each command: nft checks references as commands are added.
            for t in work.values():
                self._check_refs(t)
        self.tables = work

    def _block(self, t: Table, lines: list[str], i: int) -> int:
        """A `table … {` block: set/map declarations and chains, up to the closing brace."""
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if line == "}":
                return i
            if line.startswith("comment "):
                continue
            if m := re.match(r"^(?:set|map) (\S+) \{.*\}$", line):
                t.maps.setdefault(m.group(1), {})
            elif m := re.match(r"^chain (\S+) \{$", line):
                rules = t.chains.setdefault(m.group(1), [])
                while (r := lines[i].strip()) != "}":
                    i += 1
                    if not r.startswith("type "):
                        rules.append(r)
                i += 1
            else:
                raise Refused(f"unknown table line: {line[:120]}")
        raise Refused("unterminated table block")

    @staticmethod
    def _check_refs(t: Table) -> None:
        chains, sets = t.refs()
        if missing := chains - set(t.chains):
            raise Refused(f"references to undeclared chains: {sorted(missing)[:5]}")
        if missing := sets - set(t.maps):
            raise Refused(f"references to undeclared sets/maps: {sorted(missing)[:5]}")
