"""Writes rendered rules into the kernel with iptables-restore, like kube-proxy.

- One `iptables-restore -w 5 --noflush --counters` per IP family: `--noflush` so only
  the chains named in the input are replaced and everybody else's rules stay; a chain
  line (":KUBE-SVC-X - [0:0]") flushes just that chain.
- The jumps from built-in chains (PREROUTING → KUBE-SERVICES, ...) cannot be part of a
  --noflush restore without owning the whole built-in chain, so they are checked with
  `iptables -C` and inserted with `-I` only when missing (at start and every full sync).
- A failed restore changes nothing else: no flush, no fallback; the caller raises and
  the next sync is a full one. The failure is turned into one log line naming the table,
  chain and rule that iptables-restore rejected.
- `cleanup` removes kube-proxy's chains and the jumps to them, nothing else.

kube-proxy's `-W 100000` (lock wait interval) is not passed: iptables >= 1.8 ignores it
and legacy prints a deprecation warning on every call.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proxy.iptables import names
from proxy.iptables.backend import Backend, run
from proxy.iptables.render import saved_chains

log = logging.getLogger("proxy.iptables")

WAIT = ("-w", "5")  # wait up to 5 s for the xtables lock (kube-proxy's value)
RESTORE_FLAGS = (*WAIT, "--noflush", "--counters")
HINT_CHAIN = "KUBE-IPTABLES-HINT"  # tells iptables-wrapper which backend is in use
KUBELET_CANARY = "KUBE-KUBELET-CANARY"

# Chains kube-proxy (and this proxy) own besides the per-Service ones, per table, as in
# kube-proxy's CleanupLeftovers.
OWNED_CHAINS = {
    "nat": {
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-PROXY-CANARY",
    },
    "filter": {
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
    },
    "mangle": {"KUBE-PROXY-CANARY"},
}
# kubelet's hint chain, which this proxy also writes: removed only when no kubelet uses
# this backend (no KUBE-KUBELET-CANARY). kubelet's KUBE-FIREWALL is never touched, as in
# kube-proxy.
KUBELET_SHARED = {"mangle": {HINT_CHAIN}}
CLEANUP_TABLES = ("nat", "filter", "mangle")

Jump = tuple[str, str, str, tuple[str, ...]]  # (table, builtin chain, kube chain, args)


class RestoreError(RuntimeError):
    """iptables-restore refused the input; nothing was flushed."""

    def __init__(self, message: str, failure: Failure | None = None) -> None:
        super().__init__(message)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class Failure:
    """Where an iptables-restore input went wrong."""

    line: int = 0  # 1-based line of the input, 0 when unknown
    table: str = ""
    chain: str = ""
    rule: str = ""  # the input line (a rule, or "-X CHAIN"); "" for COMMIT/unknown
    reason: str = ""
    referenced_by: tuple[str, ...] = ()  # rules elsewhere still jumping to `chain`

    def describe(self) -> str:
        where = []
        if self.table:
            where.append(f"table {self.table}")
        if self.chain:
            where.append(f"chain {self.chain}")
        if self.line:
            where.append(f"line {self.line}")
        text = f"iptables-restore failed ({', '.join(where) or 'unknown place'})"
        if self.reason:
            text += f": {self.reason}"
        if self.rule:
            text += f" [rule: {self.rule[:200]}]"
        if self.referenced_by:
            refs = "; ".join(r[:200] for r in self.referenced_by[:3])
            more = len(self.referenced_by) - 3
            text += f" [still referenced by: {refs}{f' and {more} more' if more > 0 else ''}]"
        return text


# iptables-nft's transaction errors (nft.c): "line N: CHAIN_DEL failed (Device or resource
# busy): chain KUBE-SVC-…"; the object is "table X", "chain X", "rule in chain X", "set X".
_NFT_OP = re.compile(
    r"(?:line (\d+): )?([A-Z_]+ failed \([^)]*\))(?:: (table|chain|rule in chain|set) (\S+))?"
)
# Both backends' parser errors: the message, then "Error occurred at line: N".
_ERROR_AT = re.compile(r"Error occurred at line: (\d+)")
# "line N failed" (legacy's -X/-F/commit failures, nft's "…: line N failed: why").
_LINE_FAILED = re.compile(r"line (\d+) failed(?:: (.+))?")
_COMMIT_EXPECTED = re.compile(r"COMMIT expected at line (\d+)")
_NAME_RE = re.compile(r"[`'\"]([A-Za-z0-9_.:-]+)'")
_NOISE = ("Try `", "Ignoring deprecated", "# Warning", "Error occurred at line")
# "iptables-nft-restore v1.8.9 (nf_tables): ", possibly twice, or "iptables-restore: ".
_PROGRAM = re.compile(r"^(?:[\w.-]*restore(?: v[\d.]+(?: \([\w_]+\))?)?:\s*)+")


def _messages(stderr: str) -> list[str]:
    """stderr's meaningful lines, without the program prefix and the usage hints."""
    out = []
    for raw in stderr.splitlines():
        line = _PROGRAM.sub("", raw.strip())
        if line and not line.startswith(_NOISE):
            out.append(line)
    return out


def _chain_of(line: str) -> str:
    parts = line.split()
    if line.startswith(":") and parts:
        return parts[0][1:]
    if len(parts) >= 2 and parts[0] in ("-A", "-I", "-D", "-X", "-F", "-N", "-R"):
        return parts[1]
    return ""


def _where(stderr: str, messages: list[str]) -> tuple[int, str, str]:
    """(line, reason, chain named by the error) from iptables-restore's stderr."""
    for msg in messages:
        m = _NFT_OP.search(msg)
        if m and (m.group(1) or m.group(3)):
            chain = m.group(4) if m.group(3) in ("chain", "rule in chain") else ""
            return int(m.group(1) or 0), m.group(2), chain or ""
    m = _ERROR_AT.search(stderr)
    if m:
        return int(m.group(1)), messages[0] if messages else "", ""
    for msg in messages:
        m = _LINE_FAILED.search(msg)
        if m:
            return int(m.group(1)), m.group(2) or "", ""
        m = _COMMIT_EXPECTED.search(msg)
        if m:
            return int(m.group(1)), msg, ""
    return 0, " ".join(messages)[:200], ""


def locate_failure(text: str, stderr: str) -> Failure:
    """Map iptables-restore's complaint back to the input: line, table, chain, rule. Pure.

    The forms, as iptables 1.8.9 prints them (tests/unit/test_iptables_backend_restore.py
    holds real outputs of both backends):
    - nft transaction errors name the line, the operation, errno and the object:
      `line 5: CHAIN_DEL failed (Device or resource busy): chain KUBE-SVC-…`;
    - parser errors (both backends): the message, then `Error occurred at line: N`; nft
      reports a table's COMMIT line for a missing jump target, so the name it complains
      about is looked up in that table's rules;
    - legacy's commit-time failures (e.g. deleting a chain still referenced) say only
      `line N failed`: the line itself names the chain and what was done to it.
    """
    messages = _messages(stderr)
    lineno, reason, named = _where(stderr, messages)
    lines = text.splitlines()
    if not 0 < lineno <= len(lines):  # unknown, or past the end (a missing COMMIT)
        return Failure(lineno, chain=named, reason=reason or stderr.strip()[:200])
    table, start = "", 0
    for i in range(lineno - 1, -1, -1):
        if lines[i].startswith("*"):
            table, start = lines[i][1:].strip(), i
            break
    rule = lines[lineno - 1].strip()
    if rule == "COMMIT":
        m = _NAME_RE.search(reason)
        if m:
            word = m.group(1)
            for cand in lines[start : lineno - 1]:
                if cand.startswith("-") and re.search(rf"(^|\s){re.escape(word)}(\s|$)", cand):
                    rule = cand.strip()
                    break
    chain = named or _chain_of(rule)
    return Failure(lineno, table, chain, "" if rule == "COMMIT" else rule, reason)


def rewritten_chains(text: str, table: str) -> set[str]:
    """Chains a restore input declares (and so rewrites) in `table`. Pure."""
    out: set[str] = set()
    current = ""
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif line.startswith(":") and current == table:
            out.add(line[1:].split()[0])
    return out


def references(dump: TableDump | None, chain: str, rewritten: set[str]) -> tuple[str, ...]:
    """The rules of a table that jump to `chain` from chains the input does not rewrite:
    what keeps the chain from being deleted (a rule outside this proxy). Pure."""
    if dump is None or not chain:
        return ()
    return tuple(
        rule
        for c, rule in dump.rules
        if c != chain and c not in rewritten and _target(rule) == chain
    )


# -- iptables-save parsing ----------------------------------------------------------------


@dataclass
class TableDump:
    chains: dict[str, str] = field(default_factory=dict)  # name → policy ("-" for user)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, "-A ..." line)


def parse_save(text: str) -> dict[str, TableDump]:
    """iptables-save output → per-table chains and rules. Pure."""
    tables: dict[str, TableDump] = {}
    cur: TableDump | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], TableDump())
        elif cur is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            parts = line[1:].split()
            cur.chains[parts[0]] = parts[1] if len(parts) > 1 else "-"
        elif line.startswith("-A "):
            cur.rules.append((line.split()[1], line))
    return tables


def _target(rule: str) -> str:
    parts = rule.split()
    for i, p in enumerate(parts[:-1]):
        if p in ("-j", "--jump", "-g", "--goto"):
            return parts[i + 1]
    return ""


def owned_chains(table: str, dump: TableDump, kubelet_present: bool) -> set[str]:
    """The chains of `table` that kube-proxy (or this proxy) made and cleanup removes."""
    own = set(OWNED_CHAINS.get(table, ()))
    if not kubelet_present:
        own |= KUBELET_SHARED.get(table, set())
    return {c for c in dump.chains if c in own or names.is_service_chain(c)}


def cleanup_text(tables: dict[str, TableDump]) -> dict[str, str]:
    """Per table, the --noflush restore input removing our chains and every rule that
    jumps to them (from built-in or foreign chains). Empty tables are left out. Pure."""
    kubelet = any(KUBELET_CANARY in d.chains for d in tables.values())
    out = {}
    for table in CLEANUP_TABLES:
        dump = tables.get(table)
        if dump is None:
            continue
        doomed = owned_chains(table, dump, kubelet)
        if not doomed:
            continue
        lines = [f"*{table}"]
        for chain, rule in dump.rules:
            if chain not in doomed and _target(rule) in doomed:
                lines.append("-D" + rule[2:])
        lines += [f":{c} - [0:0]" for c in sorted(doomed)]  # flush first: no references
        lines += [f"-X {c}" for c in sorted(doomed)]
        lines.append("COMMIT")
        out[table] = "\n".join(lines) + "\n"
    return out


# -- the applier --------------------------------------------------------------------------


class Applier:
    """Runs iptables-restore / iptables for one backend (mode and IP family)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.last_restore_seconds = 0.0

    async def restore(self, text: str, *, timeout: float = 120.0) -> float:
        """Apply `text` with --noflush; returns the wall time. Raises RestoreError."""
        t0 = time.perf_counter()
        res = await run([self.backend.restore, *RESTORE_FLAGS], stdin=text, timeout=timeout)
        self.last_restore_seconds = time.perf_counter() - t0
        if res.rc != 0:
            fail = locate_failure(text, res.err or res.out)
            if fail.rule.startswith("-X ") and fail.table:
                fail = await self._holders(fail, rewritten_chains(text, fail.table))
            raise RestoreError(f"{self.backend}: {fail.describe()}", fail)
        return self.last_restore_seconds

    async def _holders(self, fail: Failure, rewritten: set[str]) -> Failure:
        """A chain that could not be deleted: name the rules that still jump to it (a rule
        outside this proxy, typically), so the operator knows what to remove."""
        try:
            dump = parse_save(await self.save(fail.table)).get(fail.table)
        except RestoreError:
            return fail
        return dataclasses.replace(fail, referenced_by=references(dump, fail.chain, rewritten))

    async def _ipt(self, *args: str) -> tuple[int, str]:
        res = await run([self.backend.iptables, *WAIT, *args], timeout=30)
        return res.rc, (res.err or res.out).strip()

    async def ensure_chain(self, table: str, chain: str) -> None:
        rc, err = await self._ipt("-t", table, "-N", chain)
        if rc not in (0, 1):  # 1: it already exists
            raise RestoreError(f"{self.backend}: cannot create chain {table}/{chain}: {err}")

    async def ensure_jumps(self, jumps: Iterable[Jump]) -> list[str]:
        """Make sure every jump from a built-in chain exists; returns those inserted
        ("table/BUILTIN → CHAIN").

        One iptables-save first: a jump to a chain that does not exist cannot exist
        either, so those chains and jumps are made in one restore (a fresh node pays one
        save and one restore instead of four commands per jump). A jump whose chain
        exists is checked with `-C` and inserted (`-I`, prepend, as kube-proxy) if missing.
        """
        jumps = list(jumps)
        text, inserted = missing_chain_jumps(jumps, saved_chains(await self.save()))
        if text:
            await self.restore(text)
            for label in inserted:
                log.debug("%s: added jump %s", self.backend, label)
        made = set(inserted)
        for table, builtin, chain, args in jumps:
            if _jump_label(table, builtin, chain) in made:
                continue
            spec = jump_spec(chain, args)
            rc, _ = await self._ipt("-t", table, "-C", builtin, *spec)
            if rc == 0:
                continue
            rc, err = await self._ipt("-t", table, "-I", builtin, *spec)
            if rc != 0:
                raise RestoreError(f"{self.backend}: cannot add jump {builtin} → {chain}: {err}")
            log.debug("%s: added jump %s/%s → %s", self.backend, table, builtin, chain)
            inserted.append(_jump_label(table, builtin, chain))
        return inserted

    async def ensure_hint(self) -> None:
        """KUBE-IPTABLES-HINT in mangle (empty) marks the backend in use, so
        iptables-wrapper in other containers picks the same one."""
        await self.ensure_chain("mangle", HINT_CHAIN)

    async def save(self, table: str | None = None) -> str:
        """iptables-save output (one table, or all without creating any)."""
        res = await run([self.backend.save, *(["-t", table] if table else [])], timeout=60)
        if res.rc != 0:
            raise RestoreError(f"{self.backend}: iptables-save failed: {res.err.strip()}")
        return res.out

    async def cleanup(self) -> bool:
        """Remove kube-proxy's chains and jumps for this backend. True when clean."""
        try:
            tables = parse_save(await self.save())
        except RestoreError as e:
            log.error("%s", e)
            return False
        ok = True
        for table, text in cleanup_text(tables).items():
            n = text.count("\n-X ")
            try:
                await self.restore(text)
                log.info("%s: removed %d chains from table %s", self.backend, n, table)
            except RestoreError as e:
                log.error("cleanup: %s", e)
                ok = False
        return ok


def _jump_label(table: str, builtin: str, chain: str) -> str:
    return f"{table}/{builtin} → {chain}"


def _restore_arg(a: str) -> str:
    return f'"{a}"' if " " in a else a


def missing_chain_jumps(
    jumps: Sequence[Jump], chains: set[tuple[str, str]]
) -> tuple[str, list[str]]:
    """The --noflush restore input creating every jump target that is not in `chains`
    and inserting the jumps to it, in `jumps` order (-I: the last one listed for a
    built-in chain ends up first, as with kube-proxy's one -I per jump). Pure."""
    by_table: dict[str, list[str]] = {}
    declared: set[tuple[str, str]] = set()
    inserted: list[str] = []
    for table, builtin, chain, args in jumps:
        if (table, chain) in chains:
            continue
        lines = by_table.setdefault(table, [])
        if (table, chain) not in declared:
            declared.add((table, chain))
            lines.insert(0, f":{chain} - [0:0]")
        spec = " ".join(_restore_arg(a) for a in jump_spec(chain, args))
        lines.append(f"-I {builtin} {spec}")
        inserted.append(_jump_label(table, builtin, chain))
    text = "".join(f"*{t}\n" + "\n".join(lines) + "\nCOMMIT\n" for t, lines in by_table.items())
    return text, inserted


def jump_spec(chain: str, args: Sequence[str]) -> list[str]:
    """Rule arguments for a jump to `chain` ("-j chain" appended unless present)."""
    spec = list(args)
    if "-j" not in spec and "--jump" not in spec:
        spec += ["-j", chain]
    return spec
