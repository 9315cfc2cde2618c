"""What every suite shares: figures with their samples and targets, alternating rounds,
the progress display and the run's working context."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


@dataclass(frozen=True)
class Target:
    """A goal for the product's value: `ratio` compares it with the figure's reference
    (product / reference), `value` with an absolute number in the figure's unit."""

    op: Literal["<=", ">="]
    value: float
    of: Literal["ratio", "value"] = "ratio"

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = ratio if self.of == "ratio" else value
        if x is None:
            return None
        return x <= self.value if self.op == "<=" else x >= self.value

    def text(self, reference: str | None, unit: str) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        if self.of == "ratio":
            return f"{sign} {self.value:g}× {reference}"
        return f"{sign} {self.value:g} {unit}"


@dataclass
class Figure:
    """One measured quantity for every contender of a suite (several samples each)."""

    name: str
    unit: str
    product: str  # the contender that is this product
    reference: str | None = None  # the contender the ratio divides by
    better: Literal["lower", "higher"] = "higher"
    target: Target | None = None
    services: int | None = None  # control-plane figures: the cluster size
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, contender: str, value: float | None) -> None:
        values = self.samples.setdefault(contender, [])
        if value is not None:
            values.append(float(value))

    def value(self, contender: str) -> float | None:
        xs = self.samples.get(contender)
        return statistics.median(xs) if xs else None

    @property
    def ratio(self) -> float | None:
        """product / reference: the median of the per-round ratios when both have one
        sample per round (a shared machine's drift cancels within a round), else the
        ratio of the medians."""
        ps = self.samples.get(self.product) or []
        rs = self.samples.get(self.reference or "") or []
        if not ps or not rs:
            return None
        if len(ps) == len(rs) and all(rs):
            return statistics.median(p / r for p, r in zip(ps, rs, strict=True))
        r = statistics.median(rs)
        return statistics.median(ps) / r if r else None

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value(self.product), self.ratio) if self.target else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "unit": self.unit,
            "contenders": {c: self.value(c) for c in self.samples},
            "spread": {c: [min(xs), max(xs)] for c, xs in self.samples.items() if xs},
            "samples": self.samples,
            "product": self.product,
            "reference": self.reference,
            "better": self.better,
            "ratio": self.ratio,
            "target": self.target.text(self.reference, self.unit) if self.target else None,
            "met": self.met,
        }
        if self.services is not None:
            out["services"] = self.services
        return out


@dataclass
class SuiteResult:
    figures: list[Figure] = field(default_factory=list)
    # contender → why it produced nothing (missing tool, failed start); shown in the report
    missing: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # suite-specific data for plots

    def figure(self, name: str, **kw: Any) -> Figure:
        """The figure called `name` (created with `kw` the first time)."""
        for f in self.figures:
            if f.name == name and f.services == kw.get("services"):
                return f
        f = Figure(name=name, **kw)
        self.figures.append(f)
        return f

    def to_json(self) -> dict[str, Any]:
        return {
            "figures": [f.to_json() for f in self.figures],
            "missing": self.missing,
            "settings": self.settings,
            "notes": self.notes,
            "plots": self.plots,
            "extra": self.extra,
        }


def alternate(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, contender) in an order that alternates each round, so slow drifts of a
    shared machine fall on every contender alike."""
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            yield r, name


@dataclass
class Run:
    """What a suite gets: its options, where to write, and the progress display."""

    out: Path
    quick: bool
    options: Any  # the parsed command line
    progress: Progress
    install: bool = True  # install a missing reference tool with apt

    def task(self, description: str, total: int) -> Step:
        return Step(self.progress, self.progress.add_task(description, total=total))


@dataclasses.dataclass
class Step:
    progress: Progress
    task_id: Any

    def __call__(self, what: str) -> None:
        """Say what runs now, counting the previous step done."""
        self.progress.update(self.task_id, description=what)

    def done(self, n: int = 1) -> None:
        self.progress.advance(self.task_id, n)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
