"""gradient-conflict judged where the pair fights (issue 21, item 2: two tasks on shared
parameters): the per-layer blocks of the Gram matrix give each layer's cosine and each loss's
descent undone there (checked against numpy on the Jacobian rows), the pair is judged on the
layers where its cosine is persistently negative, and a per-task metric logged with
``probe.log`` that stops improving while the conflict holds is harm. Expected numbers are
computed here from the rows and series written into the run, not read back from the code
under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose._series import start_end
from gradprobe.diagnose.rules.layers import layer_pair
from gradprobe.diagnose.rules.task_metrics import linked_metrics
from gradprobe.record import RunWriter, load_run, pair_name

TH = Thresholds()
STEPS = 40
t = np.arange(STEPS, dtype=np.float64)
# Both fall over the start window, then settle on a compromise (each still ~0.95 of it).
COMPROMISE = np.where(t < 8, 2.3 - 1.5 * t / 8, 0.8 - 0.04 * (t - 8) / (STEPS - 9))
STILL_FALLING = np.where(t < 8, 2.3 - 1.5 * t / 8, 0.8 * np.exp(-(t - 8) / 15))


def _rows(rng, cosine, scale, size=64):
    """Two losses' gradient rows on one layer with a given cosine (up to sampling) and scale."""
    a = rng.normal(size=size)
    noise = rng.normal(size=size)
    noise -= noise @ a / (a @ a) * a
    b = cosine * a / np.linalg.norm(a) + np.sqrt(1 - cosine ** 2) * noise / np.linalg.norm(noise)
    return np.vstack([a / np.linalg.norm(a), b]) * np.asarray(scale)[:, None]


def _write(path, layers, losses, nearest_cosine, metrics=None, weights=(1.0, 1.0)):
    """``layers``: name -> (cosine, (scale a, scale b)); the nearest-layer ``grad_cosine`` is
    written as given (what the default shared set would show). Returns the rows per step."""
    rng = np.random.default_rng(0)
    names = ("task", "aux")
    w = RunWriter(path)
    w.set_meta(losses=list(names), task="task", roles={"task": "task", "aux": "task"}, every=1,
               expect_groups_per_batch=None)
    rows = []
    for s in range(STEPS):
        per_layer = {name: _rows(rng, c, scale) for name, (c, scale) in layers.items()}
        rows.append(per_layer)
        grams = {name: j @ j.T for name, j in per_layer.items()}
        gram = sum(grams.values())
        scalars = {("grad_cosine", pair_name(*names)): nearest_cosine}
        for k, name in enumerate(names):
            norm = float(np.sqrt(gram[k, k]))
            scalars |= {("loss", name): float(losses[k][s]), ("grad_norm", name): norm,
                        ("weighted_grad_norm", name): weights[k] * norm,
                        ("weight", name): weights[k]}
        for metric, values in (metrics or {}).items():
            scalars[("logged", metric)] = float(values[s])
        arrays = {("grad_gram", "shared"): gram} | {
            ("grad_gram_layer", name): g for name, g in grams.items()}
        w.write_step(s, scalars, arrays)
    w.close()
    return rows


def _conflict(path):
    found = [f for f in diagnose(load_run(path)) if f.id == "gradient-conflict"]
    return found[0] if found else None


def _numpy_where_they_fight(rows, fight, weights=(1.0, 1.0)):
    """Per step, from the rows of the ``fight`` layers concatenated: the cosine and each
    loss's descent undone, -w_b <g_a, g_b> / (w_a |g_a|^2) clipped to [0, 1]."""
    cos, undone = [], []
    for per_layer in rows:
        a, b = (np.concatenate([per_layer[name][k] for name in fight]) for k in (0, 1))
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        undone.append([np.clip(-weights[1] * (a @ b) / (weights[0] * a @ a), 0, 1),
                       np.clip(-weights[0] * (a @ b) / (weights[1] * b @ b), 0, 1)])
    return np.array(cos), np.array(undone)


def test_layer_pair_matches_the_rows():
    rng = np.random.default_rng(1)
    weights = np.array([[1.0] * 5, [0.3] * 5])
    rows = [[rng.normal(size=(2, 16)) * [[1.0], [2.0]] for _ in range(3)] for _ in range(5)]
    blocks = np.array([[j @ j.T for j in step] for step in rows])  # [T, L, 2, 2]
    blocks[2, 1, 1, :] = blocks[2, 1, :, 1] = 0.0  # loss b does not reach layer 1 at step 2
    got = layer_pair(blocks, weights, 0, 1)
    for s, step in enumerate(rows):
        for layer, (a, b) in enumerate(step):
            if s == 2 and layer == 1:
                assert not got["shared"][layer, s] and np.isnan(got["cosine"][layer, s])
                continue
            assert got["cosine"][layer, s] == pytest.approx(
                a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            assert got["undone_a"][layer, s] == pytest.approx(
                np.clip(-0.3 * (a @ b) / (a @ a), 0, 1))
            assert got["undone_b"][layer, s] == pytest.approx(
                np.clip(-(a @ b) / (0.3 * b @ b), 0, 1))
            na, nb = np.linalg.norm(a), np.linalg.norm(b)  # unweighted, as recorded
            assert got["magnitude"][layer, s] == pytest.approx(2 * na * nb / (na ** 2 + nb ** 2))


def test_a_pair_fighting_on_a_trunk_below_a_quiet_output_layer_is_found(tmp_path):
    """Two tasks on one head: the output layer shows a cosine near 0 (the nearest layer, all
    the default shared set sees), the trunk below it a strong conflict."""
    layers = {"head": (-0.05, (1.0, 1.0)), "trunk.0": (-0.7, (1.0, 1.0)),
              "trunk.1": (-0.6, (1.2, 1.1))}
    rows = _write(tmp_path / "trunk.gprobe", layers, (COMPROMISE, COMPROMISE), -0.05)
    f = _conflict(tmp_path / "trunk.gprobe")
    assert f is not None and f.evidence["judged_on"] == "layers where they fight"
    assert f.evidence["layers"] == ["trunk.0", "trunk.1"]
    cos, undone = _numpy_where_they_fight(rows, ["trunk.0", "trunk.1"])
    assert f.evidence["median_cosine"] == pytest.approx(np.median(cos))
    assert f.evidence["descent_undone"]["task"] == pytest.approx(np.median(undone[:, 0]))
    assert f.evidence["descent_undone"]["aux"] == pytest.approx(np.median(undone[:, 1]))
    head = [np.median([r["head"][0] @ r["head"][1] / np.linalg.norm(r["head"], axis=1).prod()
                       for r in rows])]
    assert f.evidence["layer_cosines"]["head"] == pytest.approx(head[0])
    assert f.evidence["plateau"] and f.severity in ("warning", "error")


def test_a_pair_fighting_on_a_shared_output_layer_above_an_agreeing_trunk_is_found(tmp_path):
    """The other way round: a large trunk where both tasks agree would hide, summed over the
    whole shared set, the output layer where they fight."""
    layers = {"head": (-0.8, (1.0, 1.0)), "trunk": (0.7, (3.0, 3.0))}
    rows = _write(tmp_path / "head.gprobe", layers, (COMPROMISE, COMPROMISE), -0.8)
    whole, _ = _numpy_where_they_fight(rows, ["head", "trunk"])
    assert np.median(whole) > 0  # over the whole shared set: no conflict at all
    f = _conflict(tmp_path / "head.gprobe")
    assert f.evidence["layers"] == ["head"]
    cos, undone = _numpy_where_they_fight(rows, ["head"])
    assert f.evidence["median_cosine"] == pytest.approx(np.median(cos))
    assert f.evidence["descent_undone"]["task"] == pytest.approx(np.median(undone[:, 0]))


def test_a_pair_that_fights_on_no_layer_is_no_conflict(tmp_path):
    """The nearest layer's recorded cosine says conflict, the blocks say the pair fights
    nowhere (as on an older file's nearest layer alone): the blocks decide."""
    layers = {"head": (-0.1, (1.0, 1.0)), "trunk": (0.3, (1.0, 1.0))}
    _write(tmp_path / "none.gprobe", layers, (COMPROMISE, COMPROMISE), -0.8)
    assert _conflict(tmp_path / "none.gprobe") is None


def _progress(values, lo=0, hi=STEPS - 1):
    """(end - middle) / (middle - start), the halves split at the judged span's middle."""
    middle = (lo + hi) / 2
    first, second = t <= middle, t > middle
    a, b = (start_end(t[h], values[h], TH) for h in (first, second))
    return (b["end"] - a["end"]) / (a["end"] - a["start"])


@pytest.mark.parametrize("metric", ["acc_task", "task/accuracy"])
def test_a_task_whose_logged_metric_stopped_improving_is_held_back(tmp_path, metric):
    """Both losses still fall (no plateau, no stall), but the task's logged accuracy stopped
    improving half-way while the conflict holds."""
    stopped = np.minimum(0.2 + 0.6 * t / 15, 0.8) + 0.002 * np.sin(t)
    layers = {"head": (-0.8, (1.0, 1.0))}
    path = tmp_path / "metric.gprobe"
    _write(path, layers, (STILL_FALLING, STILL_FALLING), -0.8, metrics={metric: stopped})
    f = _conflict(path)
    progress = _progress(stopped)
    assert progress <= TH.conflict_metric_progress
    assert f.evidence["metric_progress"]["task"] == {metric: pytest.approx(progress)}
    assert not f.evidence["plateau"] and f.evidence["stalled"] == []
    assert f.evidence["metric_stalled"] == ["task"] and f.evidence["suffering"] == ["task"]
    assert f.severity in ("warning", "error") and "stopped improving" in f.title


def test_a_logged_metric_still_improving_is_no_harm(tmp_path):
    improving = 0.2 + 0.6 * t / STEPS
    path = tmp_path / "improving.gprobe"
    _write(path, {"head": (-0.8, (1.0, 1.0))}, (STILL_FALLING, STILL_FALLING), -0.8,
           metrics={"val_task": 2.0 - improving, "acc_aux": improving})
    f = _conflict(path)
    assert f.evidence["metric_progress"]["task"]["val_task"] == pytest.approx(
        _progress(2.0 - improving))
    assert f.evidence["metric_progress"]["aux"]["acc_aux"] == pytest.approx(_progress(improving))
    assert _progress(improving) > 0.5
    assert f.evidence["metric_stalled"] == [] and f.severity == "info"


def test_metrics_are_linked_to_a_loss_by_whole_words(tmp_path):
    path = tmp_path / "names.gprobe"
    w = RunWriter(path)
    w.set_meta(losses=["left", "right"], task="left", every=1, expect_groups_per_batch=None)
    w.write_step(0, {("loss", "left"): 1.0, ("loss", "right"): 1.0,
                     ("logged", "val_left"): 1.0, ("logged", "left/acc"): 1.0,
                     ("logged", "leftover"): 1.0, ("logged", "acc_right"): 1.0,
                     ("logged", "lr"): 1.0})
    w.close()
    run = load_run(path)
    assert sorted(linked_metrics(run, "left")) == ["left/acc", "val_left"]
    assert linked_metrics(run, "right") == ["acc_right"]


class _SharedHead(nn.Module):
    """One trunk and one head for two tasks with independent labels: the tasks fight."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.trunk(x))


def test_a_real_shared_head_run_is_judged_on_its_blocks(tmp_path):
    torch.manual_seed(0)
    model = _SharedHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(256, 8)
    left, right = (x[:, :2].argmax(1), x[:, 2:4].argmax(1) + 2)  # independent labels
    grams = []
    path = tmp_path / "real.gprobe"
    probe = gradprobe.Probe(model, run_file=path, every=1, roles={"right": "task"})
    with probe:
        for _ in range(60):
            out = model(x)
            losses = {"left": F.cross_entropy(out, left), "right": F.cross_entropy(out, right)}
            per_layer = {}
            for name, module in (("trunk.0", model.trunk[0]), ("head", model.head)):
                rows = [torch.cat([g.flatten() for g in torch.autograd.grad(
                    loss, list(module.parameters()), retain_graph=True)]).double().numpy()
                    for loss in losses.values()]
                per_layer[name] = np.vstack(rows)
            grams.append(per_layer)
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
    run = load_run(path)
    assert sorted(run.array_names("grad_gram_layer")) == ["head", "trunk.0"]
    f = _conflict(path)
    assert f is not None and f.evidence["judged_on"] == "layers where they fight"
    for layer in ("head", "trunk.0"):
        cos = [r[layer][0] @ r[layer][1] / np.linalg.norm(r[layer], axis=1).prod()
               for r in grams]
        # the judged steps are all steps but those where the task no longer learns
        assert f.evidence["layer_cosines"][layer] == pytest.approx(np.median(cos), abs=0.05)
    fight = [layer for layer in ("trunk.0", "head") if
             np.median([r[layer][0] @ r[layer][1] / np.linalg.norm(r[layer], axis=1).prod()
                        for r in grams]) <= TH.conflict_median_cosine]
    assert sorted(f.evidence["layers"]) == sorted(fight) and fight


def test_a_swamped_loss_that_stalls_is_no_evidence_of_a_conflict(tmp_path):
    """Three losses, no blocks: 'aux' is swamped by 'task' (ratio 0.02, gradient-swamping) and
    stays flat while 'other', at its own scale, falls against it (cos -0.8): the stall is the
    swamping's, named there, not the conflict's (without the exemption: a stall warning)."""
    names, norms = ("task", "aux", "other"), (1.0, 0.02, 0.02)
    flat = np.full(STEPS, 1.0)
    path = tmp_path / "swamped.gprobe"
    w = RunWriter(path)
    w.set_meta(losses=list(names), task="task", roles={n: "task" for n in names}, every=1,
               expect_groups_per_batch=None)
    for s in range(STEPS):
        scalars = {("grad_cosine", pair_name("aux", "other")): -0.8,
                   ("grad_cosine", pair_name("task", "aux")): 0.0,
                   ("grad_cosine", pair_name("task", "other")): 0.0}
        for name, loss, norm in zip(names, (STILL_FALLING, flat, STILL_FALLING), norms):
            scalars |= {("loss", name): float(loss[s]), ("grad_norm", name): norm,
                        ("weighted_grad_norm", name): norm, ("weight", name): 1.0}
        w.write_step(s, scalars)
    w.close()
    findings = diagnose(load_run(path))
    swamped = [f for f in findings if f.id == "gradient-swamping"]
    assert "aux" in [f.subject for f in swamped if f.severity != "info"]
    f = next(f for f in findings if f.id == "gradient-conflict")
    ratios = f.evidence["loss_ratios"]
    assert ratios["aux"] == pytest.approx(1.0) and ratios["other"] < TH.conflict_stall_fraction
    assert f.evidence["stalled"] == [] and f.severity == "info"


def test_two_tasks_still_converging_on_their_compromise_are_held_back(tmp_path):
    """Opposite label maps on one output layer (the MultiMNIST mirror): each loss's descent is
    about half undone there and both are still converging on the compromise after the run,
    each ending at ~0.62 of its level after the start window: harm."""
    converging = np.where(t < 8, 2.3 - 1.5 * t / 8, 0.4 + 0.4 * np.exp(-(t - 8) / 10))
    rows = _write(tmp_path / "converging.gprobe", {"head": (-0.45, (1.0, 1.0))},
                  (converging, converging), -0.45)
    f = _conflict(tmp_path / "converging.gprobe")
    settled = np.median(converging[32:]) / np.median(converging[8:16])
    _, undone = _numpy_where_they_fight(rows, ["head"])
    assert f.evidence["settled_ratios"]["task"] == pytest.approx(settled)
    assert f.evidence["descent_undone"]["task"] == pytest.approx(np.median(undone[:, 0]))
    assert TH.conflict_plateau_fraction <= settled < 0.7
    assert TH.conflict_undone_fraction <= np.median(undone, axis=0).min() < 0.5
    assert f.evidence["plateau"] and f.severity in ("warning", "error")
