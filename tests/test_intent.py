"""Roles judged by their source, inert-loss judged by intent, and remedies with numbers.

A role from the name is a hint: it never exempts a loss from a rule that applies to every loss;
declared roles and roles read from the graph do. A loss that trains only its own parameters is
inert only when it was meant to shape the shared layers; where that intent is unknown the
finding is ``info`` with the declaration that settles it. Each remedy's numbers are checked
against numpy on the series the test wrote.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose._series import exempt_losses, own_parameter_losses, role_records
from gradprobe.diagnose.rules.remedies import (CLUSTERING, CODEBOOK, balancing_weight,
                                               prototype_collapse_remedy)
from gradprobe.record import RunWriter, load_run, pair_name, run_from_state


def _record(name, role, source, hint=None, reach="shared"):
    return {"name": name, "role": role, "source": source, "hint": hint, "reach": reach}


def _write(tmp_path, losses, roles, rows, records=None, events=(), **meta):
    path = tmp_path / f"run{len(list(tmp_path.glob('run*.gprobe')))}.gprobe"
    w = RunWriter(path)
    extra = {"role_records": records} if records is not None else {}
    w.set_meta(losses=list(losses), task=losses[0], roles=roles, every=1,
               expect_groups_per_batch=None, **extra, **meta)
    for step, scalars in rows:
        w.write_step(step, scalars)
    for step, kind, name, message in events:
        w.add_event(step, kind, name, message)
    w.close()
    return load_run(path)


def _found(run, finding_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [f for f in diagnose(run) if f.id == finding_id]


# ------------------------------------------------------------- names never exempt: swamping

def _swamped_rows(steps=40, seed=0):
    """'cls' (the task, still learning) with a weighted gradient ~1/200 of 'reg''s, both weights
    fixed at 1; returns the rows and the two weighted-norm series."""
    rng = np.random.default_rng(seed)
    cls_norm = 0.5 * rng.uniform(0.9, 1.1, steps)
    reg_norm = 100.0 * rng.uniform(0.9, 1.1, steps)
    rows = [(s, {("loss", "cls"): 2.0 - 0.01 * s, ("loss", "reg"): 1000.0 - s,
                 ("grad_norm", "cls"): cls_norm[s], ("grad_norm", "reg"): reg_norm[s],
                 ("weighted_grad_norm", "cls"): cls_norm[s],
                 ("weighted_grad_norm", "reg"): reg_norm[s],
                 ("weight", "cls"): 1.0, ("weight", "reg"): 1.0}) for s in range(steps)]
    return rows, cls_norm, reg_norm


@pytest.mark.parametrize("source, swamped", [("name", True), ("declared", False),
                                             ("graph", False)])
def test_a_role_from_the_name_never_exempts_from_swamping(tmp_path, source, swamped):
    rows, cls_norm, reg_norm = _swamped_rows()
    records = [_record("cls", "task", "first"),
               _record("reg", "regularization", source, hint="reg" if source == "name" else None)]
    run = _write(tmp_path, ["cls", "reg"], {"cls": "task", "reg": "regularization"}, rows,
                 records)
    assert exempt_losses(run, Thresholds()) == (set() if swamped else {"reg"})
    found = _found(run, "gradient-swamping")
    assert [f.subject for f in found] == (["cls"] if swamped else [])
    if swamped:
        ratio = np.median(cls_norm / reg_norm)
        assert found[0].evidence["median_ratio"] == pytest.approx(ratio)


def _windows(values, th):
    """Start and end window medians as the rules read them, recomputed with numpy: the
    probe steps within window_share of the span from either end, at least min_points."""
    steps = np.arange(len(values))
    reach = th.window_share * (steps[-1] - steps[0])
    first = max(th.min_points, int(np.sum(steps <= reach)))
    last = max(th.min_points, int(np.sum(steps >= steps[-1] - reach)))
    return np.median(values[:first]), np.median(values[-last:])


@pytest.mark.parametrize("task_ends_at", [1.0, 0.25])
def test_a_penalty_counts_as_a_competitor_only_of_a_loss_it_held_back(tmp_path, task_ends_at):
    """A regulariser from the graph that falls to a tenth of its start while the task, at
    1/200 of its gradient, falls and then rises back to ``task_ends_at`` of where it began:
    back at its start the task never recovered its fit (swamped, static weights); at a
    quarter of it the trade-off is healthy and the penalty stays out of the balance."""
    th = Thresholds()
    rows, cls_norm, reg_norm = _swamped_rows()
    steps = len(rows)
    cls_loss = 2.0 - 2.0 * (1 - task_ends_at) * np.arange(steps) / (steps - 1)
    cls_loss[: steps // 2] -= 0.5 * np.sin(np.linspace(0, np.pi, steps // 2))
    reg_loss = np.linspace(1000.0, 100.0, steps)
    for s, scalars in rows:
        scalars[("loss", "cls")], scalars[("loss", "reg")] = cls_loss[s], reg_loss[s]
    run = _write(tmp_path, ["cls", "reg"], {"cls": "task", "reg": "regularization"}, rows,
                 [_record("cls", "task", "first"), _record("reg", "regularization", "graph")])
    assert exempt_losses(run, th) == {"reg"}
    (cls_start, cls_end), (reg_start, reg_end) = _windows(cls_loss, th), _windows(reg_loss, th)
    assert reg_end / reg_start < th.swamping_stall_fraction
    held = cls_end / cls_start >= th.swamping_stall_fraction
    assert held == (task_ends_at == 1.0)
    swamping, static = _found(run, "gradient-swamping"), _found(run, "static-loss-weights")
    assert [f.subject for f in swamping] == (["cls"] if held else [])
    assert [f.subject for f in static] == (["cls"] if held else [])
    if held:
        f = swamping[0]
        assert f.evidence["dominant"] == "reg" and f.severity == "error"  # 0.5% < 1%
        assert "it is held back: it ends at" in f.title  # why a penalty is named
        assert f.evidence["median_ratio"] == pytest.approx(np.median(cls_norm / reg_norm))
        assert f.evidence["held_back"]["end_fraction"] == pytest.approx(cls_end / cls_start)
        assert f.evidence["held_back"]["dominant_end_fraction"] == pytest.approx(
            reg_end / reg_start)


def test_the_swamping_and_static_weight_remedies_print_the_balancing_weight(tmp_path):
    rows, cls_norm, reg_norm = _swamped_rows()
    run = _write(tmp_path, ["cls", "reg"], {"cls": "task", "reg": "regularization"}, rows,
                 [_record("cls", "task", "first"),
                  _record("reg", "regularization", "name", hint="reg")])
    (swamping,) = _found(run, "gradient-swamping")
    (static,) = _found(run, "static-loss-weights")
    # Independently: the weight that makes cls's median weighted norm equal reg's.
    balanced = 1.0 * np.median(reg_norm) / np.median(cls_norm)
    for finding in (swamping, static):
        numbers = re.search(r"weight 'cls' 1 -> ([0-9.e+]+) \(or the weight of 'reg' x([0-9.e-]+)\)",
                            finding.remedy)
        assert numbers, finding.remedy
        assert float(numbers.group(1)) == pytest.approx(balanced, rel=5e-3)
        assert float(numbers.group(2)) == pytest.approx(1 / balanced, rel=5e-3)
        assert "GradNormBalancer" in finding.remedy and "Kendall" in finding.remedy


def test_balancing_weight_equalises_the_weighted_norms():
    raw_own, raw_dominant, weight = 0.02, 3.0, 0.5
    balanced = balancing_weight(weight, weight * raw_own, 2.0 * raw_dominant)
    assert balanced * raw_own == pytest.approx(2.0 * raw_dominant)
    assert balancing_weight(None, 0.1, 1.0) == pytest.approx(10.0)  # unrecorded weight: 1
    assert np.isnan(balancing_weight(1.0, 0.0, 1.0))


# ------------------------------------------------------------- names never exempt: conflict

def _conflict_rows(steps=40):
    pair = pair_name("task", "kl")
    return [(s, {("loss", "task"): 2.0 - 0.01 * s, ("loss", "kl"): 1.0 - 0.01 * s,
                 ("grad_norm", "task"): 1.0, ("grad_norm", "kl"): 1.0,
                 ("weighted_grad_norm", "task"): 1.0, ("weighted_grad_norm", "kl"): 1.0,
                 ("weight", "task"): 1.0, ("weight", "kl"): 1.0,
                 ("grad_cosine", pair): -0.5}) for s in range(steps)]


@pytest.mark.parametrize("source, judged", [("name", True), ("declared", False)])
def test_a_role_from_the_name_never_exempts_from_conflict(tmp_path, source, judged):
    run = _write(tmp_path, ["task", "kl"], {"task": "task", "kl": "kl"}, _conflict_rows(),
                 [_record("task", "task", "first"), _record("kl", "kl", source, hint="kl")])
    found = _found(run, "gradient-conflict")
    assert len(found) == int(judged)
    if judged:
        assert found[0].evidence["median_cosine"] == pytest.approx(-0.5)


@pytest.mark.parametrize("role, severity", [("kl", "info"), ("other", "warning")])
def test_a_held_back_loss_against_a_term_named_as_a_regulariser_is_a_trade_off(tmp_path, role,
                                                                               severity):
    # 'kl' stays flat (end/start 1, it stalled) while 'task' halves: harm by the stall test.
    rows = [(s, {**scalars, ("loss", "task"): 2.0 - 0.025 * s, ("loss", "kl"): 1.0})
            for s, scalars in _conflict_rows()]
    run = _write(tmp_path, ["task", "kl"], {"task": "task", "kl": role}, rows,
                 [_record("task", "task", "first"), _record("kl", role, "name", hint="kl")])
    (f,) = _found(run, "gradient-conflict")
    assert f.evidence["stalled"] == ["kl"] and f.severity == severity
    if role == "kl":
        assert "from the name 'kl'" in f.title and 'roles={"kl": "task"}' in f.title
        assert "Kendall" not in f.remedy  # the generic remedy of a conflict without harm
    else:
        assert "Kendall" in f.remedy and "PCGrad" in f.remedy


def test_an_older_run_file_counts_guessed_roles_as_from_the_name(tmp_path):
    rows, _, _ = _swamped_rows()
    roles = {"cls": "task", "reg": "regularization"}
    guessed = _write(tmp_path, ["cls", "reg"], roles, rows, roles_guessed=["cls", "reg"])
    assert [r["source"] for r in role_records(guessed.meta)] == ["first", "name"]
    assert [f.subject for f in _found(guessed, "gradient-swamping")] == ["cls"]
    # A file that lists no guesses keeps its roles as declared, and its verdicts.
    plain = _write(tmp_path, ["cls", "reg"], roles, rows)
    assert exempt_losses(plain, Thresholds()) == {"reg"}
    assert _found(plain, "gradient-swamping") == []


# ------------------------------------------------------------------ inert-loss by intent

_OWN_ONLY = "loss {!r} shares no parameter with the task loss 'task' (computed from detached " \
    "features?): it reaches none of the shared parameters"


def _own_only_run(tmp_path, name, record, kind="no_shared_path", steps=12):
    rows = [(s, {("loss", "task"): 1.0, ("loss", name): 1.0, ("grad_norm", "task"): 1.0,
                 ("grad_norm", name): 0.0}) for s in range(steps)]
    message = _OWN_ONLY.format(name) if kind == "no_shared_path" else "no gradient path"
    return _write(tmp_path, ["task", name], {"task": "task", name: record["role"]}, rows,
                  [_record("task", "task", "first"), record],
                  events=[(s, kind, name, message) for s in range(steps)])


def test_a_loss_of_unknown_intent_on_its_own_parameters_is_info_with_the_settling_line(tmp_path):
    run = _own_only_run(tmp_path, "codebook", _record("codebook", "other", "name", reach="own"))
    (f,) = _found(run, "inert-loss")
    assert f.severity == "info"
    assert 'Probe(..., roles={"codebook": "prototype"})' in f.title
    assert 'Probe(..., roles={"codebook": "adversarial"})' in f.title
    assert 'declare it (Probe(..., roles={"codebook": "prototype"}))' in f.remedy
    # Neither a declared codebook role nor the zero gradient on the shared set turns it into
    # a warning; a role hinted only by the name does not settle it either.
    assert _found(_own_only_run(tmp_path, "codebook", _record(
        "codebook", "prototype", "declared", reach="own")), "inert-loss") == []
    (hinted,) = _found(_own_only_run(tmp_path, "proto", _record(
        "proto", "prototype", "name", hint="proto", reach="own")), "inert-loss")
    assert hinted.severity == "info"


@pytest.mark.parametrize("name, role, hint, source, origin", [
    ("s_domain", "adversarial", "domain", "name", "from the name 'domain'"),
    ("s_domain", "adversarial", "domain", "declared", "declared"),
    # A FitNets hint read through a regressor from the detached student.
    ("hint", "distillation", "hint", "name", "from the name 'hint'"),
])
def test_a_loss_meant_to_shape_the_shared_layers_that_misses_them_warns(tmp_path, name, role,
                                                                         hint, source, origin):
    record = _record(name, role, source, hint=hint, reach="own")
    (f,) = _found(_own_only_run(tmp_path, name, record), "inert-loss")
    assert f.severity == "warning"
    assert f.title.endswith(f"(role {role}, {origin})")
    assert f.evidence["role_source"] == source


def test_a_loss_on_loss_weights_only_is_not_inert_and_no_path_at_all_is(tmp_path):
    weights = _record("log_variance", "regularization", "graph", reach="loss-weights")
    assert _found(_own_only_run(tmp_path, "log_variance", weights, kind="inert_loss"),
                  "inert-loss") == []
    nothing = _record("aux", "other", "name", reach="none")
    (f,) = _found(_own_only_run(tmp_path, "aux", nothing, kind="inert_loss"), "inert-loss")
    assert f.severity == "error"


def _codebook_run(roles):
    """A tiny VQ model: 'recon' trains the encoder and decoder through the straight-through
    estimator, 'codebook' only the codebook (its input is the detached encoder output)."""
    torch.manual_seed(0)
    encoder, decoder, codebook = nn.Linear(6, 4), nn.Linear(4, 6), nn.Embedding(8, 4)
    model = nn.ModuleDict(dict(encoder=encoder, decoder=decoder, codebook=codebook))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = gradprobe.Probe(model, every=1, roles=roles)
    x = torch.randn(64, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe's live notice of the own-only loss
        for _ in range(12):
            z_e = encoder(x)
            z_q = codebook.weight[torch.cdist(z_e, codebook.weight).argmin(1)]
            straight = z_e + (z_q - z_e).detach()
            losses = {"recon": F.mse_loss(decoder(straight), x),
                      "codebook": F.mse_loss(z_q, z_e.detach())}
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
    # Independently: the codebook loss reaches the codebook and nothing else.
    z_e = encoder(x)
    z_q = codebook.weight[torch.cdist(z_e, codebook.weight).argmin(1)]
    grads = torch.autograd.grad(F.mse_loss(z_q, z_e.detach()), list(model.parameters()),
                                allow_unused=True)
    assert [name for (name, _), g in zip(model.named_parameters(), grads) if g is not None] \
        == ["codebook.weight"]
    probe.close()
    return run_from_state(probe.state_dict(), "vq")


def test_a_real_codebook_loss_is_info_until_declared():
    undeclared = _codebook_run(None)
    assert own_parameter_losses(undeclared) == ["codebook"]
    (f,) = _found(undeclared, "inert-loss")
    assert f.severity == "info" and f.subject == "codebook"
    assert _found(_codebook_run({"codebook": "prototype"}), "inert-loss") == []


# ------------------------------------------------------------ prototype-collapse remedies

def test_a_usage_collapse_gets_the_codebook_or_both_cures():
    assert prototype_collapse_remedy(False, ["codebook"]) is None  # the generic remedy stands
    codebook = prototype_collapse_remedy(True, ["codebook"])
    assert codebook.startswith("'codebook' trains only parameters of its own, as a codebook's")
    assert "dead-code reset" in codebook and "Sinkhorn" not in codebook
    unknown = prototype_collapse_remedy(True, [])
    assert CODEBOOK in unknown and CLUSTERING in unknown and "Sinkhorn" in unknown
    assert "update each prototype from its own group only" in unknown  # centre averages


def test_a_loss_that_reaches_only_parameters_outside_the_probed_model_is_inert():
    """A Fader-style latent discriminator kept outside the model given to Probe, reading the
    encoder's output detached: its loss reaches the discriminator and nothing of the model."""
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(6, 3), nn.Linear(3, 6)
    model = nn.ModuleDict(dict(encoder=encoder, decoder=decoder))
    discriminator = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = gradprobe.Probe(model, every=1)
    x, attribute = torch.randn(64, 6), (torch.rand(64) < 0.5).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe's live notice of the cut-off loss
        for _ in range(12):
            z = encoder(x)
            losses = {"rec": F.mse_loss(decoder(z), x),
                      "lat_dis": F.binary_cross_entropy_with_logits(
                          discriminator(z.detach()).squeeze(1), 1 - attribute)}
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
    # Independently: of the model's parameters, the loss reaches none.
    z = encoder(x)
    grads = torch.autograd.grad(
        F.binary_cross_entropy_with_logits(discriminator(z.detach()).squeeze(1), attribute),
        list(model.parameters()) + list(discriminator.parameters()), allow_unused=True)
    assert [g is not None for g in grads] == [False] * 4 + [True, True]
    probe.close()
    run = run_from_state(probe.state_dict(), "fader")
    record = next(r for r in role_records(run.meta) if r["name"] == "lat_dis")
    assert record["reach"] == "none"
    (f,) = _found(run, "inert-loss")
    assert f.subject == "lat_dis" and f.severity == "warning"
    assert "reaches no trainable parameter of the probed model" in f.title
