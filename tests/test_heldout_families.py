"""The families held out by source (benchmarks/validity/heldout/): declared apart from the
corpus, probed at the documented defaults, and scored over every seed. Nothing here trains
or diagnoses a held-out run: they are run once, by ``run.py --heldout``, at the end."""

from __future__ import annotations

import ast
import inspect
import importlib
from pathlib import Path

from benchmarks.validity.harness import RunRecord
import pytest

from benchmarks.validity.report import acceptance, heldout_markdown
from benchmarks.validity.run import HELDOUT_SETS, load_families
from gradprobe.diagnose import Finding


# Families whose every variant was measured harmful, with the measurement.
NO_HEALTHY_VARIANT = {"gradnorm-digits": "GradNorm, the published remedy, rescues the digit task "
                      "but drives the ink weight to its floor: ink RMSE 4-5x single-task"}


def test_heldout_sets_are_apart_from_the_corpus_and_each_other():
    corpus = load_families()
    sets = {name: load_families(heldout=name) for name in HELDOUT_SETS}
    assert all(len(sets[name]) == len(spec[1]) for name, spec in HELDOUT_SETS.items())
    names = [set(corpus)] + [set(families) for families in sets.values()]
    assert sum(map(len, names)) == len(set().union(*names))
    sources = [fam.source for families in [corpus, *sets.values()]
               for _, fam in families.values()]
    assert len(sources) == len(set(sources))


@pytest.mark.parametrize("heldout", list(HELDOUT_SETS))
def test_heldout_families_declare_their_truth(heldout):
    for module, family in load_families(heldout=heldout).values():
        assert module.startswith(HELDOUT_SETS[heldout][0] + ".")
        assert family.source and family.seeds
        assert any(v.healthy for v in family.variants) or family.name in NO_HEALTHY_VARIANT
        for v in family.variants:
            assert v.truth
            assert not (v.healthy and (v.expected or v.allowed)), (family.name, v.name)


def _probe_calls(module: str) -> list[ast.Call]:
    """The ``Probe(...)`` calls of ``module`` or, for a family that trains with another
    family's loop, of the held-out modules it imports from."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "Probe"]
    package = module.rsplit(".", 2)[0]
    for node in ast.walk(tree):
        if not calls and isinstance(node, ast.ImportFrom) and node.level == 2 and \
                node.module and node.module.startswith("heldout"):
            calls = _probe_calls(f"{package}.{node.module}")
    return calls


@pytest.mark.parametrize("heldout", list(HELDOUT_SETS))
def test_heldout_families_probe_at_the_documented_defaults(heldout):
    """Issue 21: no held-out family passes roles= or shared= (positionally or by name)."""
    package, modules = HELDOUT_SETS[heldout][:2]
    for module in (f"{package}.{m}" for m in modules):
        calls = _probe_calls(module)
        assert calls, module
        for call in calls:
            assert len(call.args) == 1, module  # the model alone: shared is the 2nd positional
            assert not {k.arg for k in call.keywords} & {"roles", "shared"}, module


def _record(family: str, variant: str, seed: int, findings: list[Finding]) -> RunRecord:
    return RunRecord(family, variant, seed, Path(f"{family}-{variant}-s{seed}.gprobe"), {"truth": 1.0},
                     1.0, 1.0, findings)


def _finding(fid: str, severity: str, subject: str) -> Finding:
    return Finding(fid, severity, "title", subject, "1", {}, "why", "remedy")


def test_heldout_acceptance_counts_every_seed():
    """The corpus's acceptance reads odd seeds only; the held-out families' reads them all: a
    false alarm on an even seed counts there, and the page lists every run."""
    families = {name: fam for name, (_, fam) in load_families(heldout="first").items()}
    fam = families["shazeer-moe"]
    records = [_record(fam.name, "balanced", 0, [_finding("gradient-swamping", "warning", "load")]),
               _record(fam.name, "weight-1e-5", 1, [_finding("prototype-collapse", "error", "router"),
                                                    _finding("gradient-swamping", "warning", "load")])]
    odd_only = {c.name: c.passed for c in acceptance(records, families)}
    every = {c.name: c.passed for c in acceptance(records, families, None)}
    assert f"{fam.name}/balanced/s0 (healthy): no warning or error" not in odd_only
    assert every[f"{fam.name}/balanced/s0 (healthy): no warning or error"] is False
    # gradient-swamping: 1 hit (load, s1), 1 miss (importance, s1), 1 false alarm (s0)
    assert every["gradient-swamping: precision >= 0.95, recall >= 0.9"] is False
    page = heldout_markdown(records, families, {"wall_seconds": 60.0, "workers": 2}, "cmd",
                            HELDOUT_SETS["first"][0])
    assert "| `gradient-swamping` | 1 | 1 | 1 | 0.50 | 0.50 |" in page
    assert "| `prototype-collapse` | 1 | 0 | 0 | 1.00 | 1.00 |" in page
    assert all(r.label in page for r in records)
