"""Stage 3: turn a recorded run into findings (the failure analysis of record-22, automated).

``diagnose(run)`` runs one small rule per finding id (:data:`RULES`, in order; each rule
also receives the findings of the rules before it) and returns the findings sorted by
severity, then causes first (``non-finite``), then id. Thresholds: :class:`Thresholds` (Python) or
:func:`load_thresholds` (TOML); docs/findings.md documents every rule and number.

The module itself is callable: ``gradprobe.diagnose(run)`` is ``gradprobe.diagnose.diagnose(run)``,
so the top-level API reads ``from gradprobe import diagnose`` while
``from gradprobe.diagnose import Thresholds`` (and ``import gradprobe.diagnose as dx``) keep
naming this package.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Callable

from gradprobe._warnings import GradprobeWarning
from gradprobe.record import Run

from ._series import is_fixed_weight
from .findings import (FINDING_IDS, REMEDY, SEVERITIES, SEVERITY_ORDER, WHY, Finding, PlotHint,
                       finding_order)
from .rules import RULES
from .thresholds import FIXED_WEIGHT_TOLERANCE, ConfigError, Thresholds, load_thresholds

__all__ = ["ConfigError", "DiagnoseWarning", "FINDING_IDS", "FIXED_WEIGHT_TOLERANCE", "Finding",
           "PlotHint", "REMEDY", "RULES", "SEVERITIES", "SEVERITY_ORDER", "Thresholds", "WHY",
           "diagnose", "is_fixed_weight", "load_thresholds"]


class DiagnoseWarning(GradprobeWarning):
    """A rule could not judge the run (unexpected data); the other rules still ran."""


def diagnose(run: Run, thresholds: Thresholds | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> list[Finding]:
    """All findings of ``run``, sorted by severity, then causes (``non-finite``, earliest
    first), then id, then subject (:func:`~.findings.finding_order`).

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
    findings.sort(key=finding_order)
    return findings


class _CallableModule(types.ModuleType):
    """This package, callable as :func:`diagnose` (see the module docstring for why)."""

    __call__ = staticmethod(diagnose)


sys.modules[__name__].__class__ = _CallableModule
