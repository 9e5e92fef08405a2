"""What the report takes from the diagnosis: its severity order, by which every view orders,
picks and counts findings (one count sentence, "1 error, 2 warnings, 1 note", for the terminal,
the PDF report and the comparison), and its default thresholds."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from gradprobe.diagnose import SEVERITY_ORDER, Thresholds

from .data import finding_value

# A level drawn where no finding gives one (the swamping ratio, the saturated share) and the
# verdict's "fixed" weight use the diagnosis' defaults.
DEFAULT_THRESHOLDS = Thresholds()


def severity_rank(severity: Any) -> int:
    """The position of ``severity`` in the diagnosis' order; an unknown one after all others."""
    return SEVERITY_ORDER.get(severity, len(SEVERITY_ORDER))


def sorted_findings(findings: Iterable[Any]) -> list[Any]:
    """Errors first, then warnings, then notes; the diagnosis' own order within a severity."""
    items = list(findings or [])
    return [f for _, f in sorted(enumerate(items), key=lambda p: (
        severity_rank(finding_value(p[1], "severity")), p[0]))]


def worst_severity(findings: Iterable[Any]) -> str | None:
    """The most severe severity among ``findings`` (None when there are none)."""
    severities = [finding_value(f, "severity") for f in findings]
    return min(severities, key=severity_rank) if severities else None


def severity_counts(findings: Iterable[Any], *, info: str = "note") -> str:
    """``"1 error, 2 warnings, 1 note"``: the findings counted by severity, worst first, each
    severity named once it occurs; ``info`` is the word for an info finding. Empty for none."""
    counts = Counter(finding_value(f, "severity") for f in findings)
    words = {"info": info}
    return ", ".join(f"{counts[s]} {words.get(s, s)}{'s' if counts[s] != 1 else ''}"
                     for s in sorted(SEVERITY_ORDER, key=SEVERITY_ORDER.get) if counts[s])


def unique(findings: Iterable[Any]) -> list[Any]:
    """``findings`` without repeats of the same finding object, in their first order."""
    seen, out = set(), []
    for f in findings:
        if id(f) not in seen:
            seen.add(id(f))
            out.append(f)
    return out
