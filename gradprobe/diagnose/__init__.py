"""Stage 4: turn a recorded run into findings (the failure analysis of record-22, automated).

``diagnose(run)`` runs one small rule per finding id (:data:`RULES`, in order; each rule
also receives the findings of the rules before it) and returns the findings sorted by
severity then id. Thresholds: :class:`Thresholds` (Python) or
:func:`load_thresholds` (TOML); docs/findings.md documents every rule and number.
"""

from __future__ import annotations

import warnings
from typing import Callable

from gradprobe.record import Run

from .findings import FINDING_IDS, REMEDY, SEVERITY_ORDER, WHY, Finding
from .rules import RULES
from .thresholds import ConfigError, Thresholds, load_thresholds

__all__ = ["ConfigError", "DiagnoseWarning", "FINDING_IDS", "Finding", "RULES", "SEVERITY_ORDER",
           "Thresholds", "diagnose", "load_thresholds"]


class DiagnoseWarning(UserWarning):
    """A rule could not judge the run (unexpected data); the other rules still ran."""


def diagnose(run: Run, thresholds: Thresholds | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> list[Finding]:
    """All findings of ``run``, sorted by severity, then id, then subject.

    ``progress(i, n, rule_id)`` is called as rule ``i`` of ``n`` (1-based) starts.
    A rule that fails on unexpected data is reported as a :class:`DiagnoseWarning` and
    skipped; it never stops the other rules.
    """
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise TypeError(f"thresholds must be a Thresholds, got {type(th).__name__}")
    findings: list[Finding] = []
    n = len(RULES)
    for i, (rule_id, rule) in enumerate(RULES.items(), start=1):
        if progress is not None:
            progress(i, n, rule_id)
        try:
            findings.extend(rule(run, th, tuple(findings)))
        except Exception as exc:  # one rule's surprise must not hide the others' findings
            warnings.warn(f"gradprobe diagnose: rule {rule_id!r} could not judge "
                          f"{getattr(run, 'source', 'the run')}: {type(exc).__name__}: {exc}",
                          DiagnoseWarning, stacklevel=2)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.id, f.subject))
    return findings
