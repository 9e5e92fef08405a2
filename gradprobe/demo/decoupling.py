"""The record-22 reproduction: the failing contrastive decoupling network and its fix.

``train("failing", ...)`` trains the model exactly as record-22 describes it:

- intrinsic encoder ``f_I`` (1-D conv over the one-hot sequence, global max pool) -> ``z_I``;
- environment encoder ``f_E`` (MLP over the cell-line context vector) -> ``z_E``;
- energy ``p = sigmoid((U_I - R_E) / T)``, ``U_I``, ``R_E`` linear heads, fixed ``T = 1``;
- ``L_cont``: InfoNCE on ``z_E`` whose positive for a sample is *another sample of the same
  cell line* (its context with fresh measurement noise, tau = 0.1): the loss exists to separate
  cell lines. Negatives are the other positives of the batch -- which, with the
  single-cell-line ``CellBatchSampler``, all come from the anchor's own cell line, so positive
  and negatives are exchangeable and the loss cannot fall below chance (record-22 root
  cause 2: "all negatives come from the same cell line ... cannot drive cross-cell-line
  separation");
- ``L_proto = ||z_E - p_c||^2`` with momentum prototypes ``p_c <- mu p_c + (1 - mu) E[z_E]``
  (a buffer, updated in the training loop after every optimiser step, mu = 0.9);
- ``L_orth = ||z_I^T z_E / B||_F^2``: strict, unnormalised orthogonality (only divided by the
  batch size so its scale does not depend on B);
- ``L_adv``: a cell-line classifier on ``z_I`` through a gradient reversal layer;
- fixed weights alpha = 0.05 (cont), beta = 0.1 (proto), gamma = 0.01 (orth), delta = 0.01 (adv).

``train("fixed", ...)`` applies the record-point-24 remedies, each switchable through
``disable`` (names in :data:`REMEDIES`):

- ``balance``: :class:`~gradprobe.remedies.GradNormBalancer` sets the auxiliary weights so that
  each weighted gradient norm on the encoders is ``BALANCE_TARGETS`` of the task's (half for
  the geometric constraints, level for the adversary; measured with ``torch.autograd.grad``
  every ``balance_every`` steps);
- ``mixed``: the sampler gives every batch all training lines in equal shares (record-22
  insight 2, "mixed batches"); the probe is told so (``expect_groups_per_batch``). In-batch
  negatives then come from other lines, and the adversary and the decorrelation see several
  lines at once: with one line per batch the adversary's head only chases that batch's line
  and the correlation of z_I with z_E has no cross-line variation to remove;
- ``memory``: a :class:`~gradprobe.remedies.MemoryBank` of the last ``MEMORY_SIZE`` positive
  *contexts* (with their cell lines) supplies cross-cell-line negatives, re-encoded by the
  current ``f_E`` every step (detached), and same-cell-line negatives are masked out; the
  probe's contrastive watch is handed the same negatives and masking. Storing features
  instead (the MoCo/XBM way, without a momentum encoder) does not work here: this small
  encoder drifts fast, each cell line learns to move away from where the *others were*, and
  the lines end up nearly on top of each other (centroid cosine 0.90, nearest-centroid
  accuracy 0.62 vs 0.97 with re-encoding; docs/demo.md);
- ``corr``: :func:`~gradprobe.remedies.correlation_loss` replaces the orthogonality loss
  (same loss name ``orth``);
- ``interaction``: energy ``U_I - R_E + lam U_I R_E`` with a learnt ``lam``;
- ``temperature``: :class:`~gradprobe.remedies.LearnableTemperature` (init 1);
- ``l1``: an extra loss ``l1 = mean|z_I| + mean|z_E|`` with weight ``L1_WEIGHT``;
- ``curriculum``: task only for the first ``CURRICULUM_START`` of the steps, then the decoupling
  losses ramp in linearly over ``CURRICULUM_RAMP`` of the steps.

Nothing here is tuned to make a finding appear: hyper-parameters are ordinary defaults for a
small model, and both variants share data, architecture and optimiser. The data
(:func:`~gradprobe.demo.data.make_data`) has 192 training sequences per cell line, which the
failing model memorises, a cell-line-specific barcode shortcut that predicts the label in the
training lines only (what the adversary exists to remove from z_I), and a sequence x cell-line
interaction (chromatin gain) that only the interaction energy can express. Prototypes, the
adversary and the probe's groups index the training lines 0..L-1. docs/demo.md reports what
the runs show.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..probe import Probe
from ..remedies import (GradNormBalancer, LearnableTemperature, MemoryBank, correlation_loss, grad_norms,
                        info_nce, interaction_energy, l1_penalty, linear_ramp)
from .data import DecouplingData, Split, make_data

__all__ = ["CellBatchSampler", "DecouplingModel", "ModelOutput", "GradReverse", "REMEDIES", "FAILING_WEIGHTS",
           "DEFAULT_STEPS", "ROLES", "train", "evaluate", "compute_losses", "build_model"]

REMEDIES = ("balance", "mixed", "memory", "corr", "interaction", "temperature", "l1", "curriculum")
FAILING_WEIGHTS = {"cont": 0.05, "proto": 0.1, "orth": 0.01, "adv": 0.01}
ROLES = {"cont": "contrastive", "proto": "prototype", "orth": "orthogonality", "adv": "adversarial"}
DEFAULT_STEPS = 1200
BATCH_SIZE = 64
LR = 3e-3
TAU = 0.1               # InfoNCE temperature
AUG_NOISE = 0.3         # context noise of the second InfoNCE view
PROTO_MOMENTUM = 0.9
# weighted aux gradient norm as a fraction of the task's: the geometric constraints at half,
# the adversary level with the task (it alone keeps cell-line identity out of z_I)
BALANCE_TARGETS = {"cont": 0.5, "proto": 0.5, "orth": 0.5, "adv": 1.0}
L1_WEIGHT = 1e-3
MEMORY_SIZE = 1024
CURRICULUM_START = 0.2  # fractions of the run
CURRICULUM_RAMP = 0.2


# --------------------------------------------------------------------------------------------
# sampler


class CellBatchSampler:
    """Yields index batches of a single cell line each (record-22's sampler) or, with ``mixed``,
    of every cell line in equal shares (record-22 insight 2: cross-cell-line batches).

    Single-line: one pass (``iter``) shuffles each cell line's indices, cuts them into batches
    of ``batch_size`` (the last, shorter batch of a line is dropped if ``drop_last``) and
    shuffles the order of the batches. Mixed: each batch takes the next ``batch_size // L``
    shuffled indices of each of the ``L`` lines, until the smallest line runs out. Re-iterating
    gives a new epoch with new shuffles.
    """

    def __init__(self, cells: torch.Tensor | np.ndarray, batch_size: int, seed: int = 0,
                 drop_last: bool = True, mixed: bool = False) -> None:
        self.cells = np.asarray(cells)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.mixed = mixed
        self.rng = np.random.default_rng(seed)
        self.by_cell = {int(c): np.nonzero(self.cells == c)[0] for c in np.unique(self.cells)}
        self.per_line = self.batch_size // len(self.by_cell)
        if mixed and self.per_line < 1:
            raise ValueError("a mixed batch needs at least one sample of every cell line")

    def __len__(self) -> int:
        if self.mixed:
            return min(len(idx) for idx in self.by_cell.values()) // self.per_line
        n = 0
        for idx in self.by_cell.values():
            n += len(idx) // self.batch_size if self.drop_last else math.ceil(len(idx) / self.batch_size)
        return n

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.mixed:
            shuffled = [self.rng.permutation(idx) for idx in self.by_cell.values()]
            for b in range(len(self)):
                yield np.concatenate([idx[b * self.per_line:(b + 1) * self.per_line] for idx in shuffled])
            return
        batches = []
        for idx in self.by_cell.values():
            idx = self.rng.permutation(idx)
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        for i in self.rng.permutation(len(batches)):
            yield batches[i]


# --------------------------------------------------------------------------------------------
# model


class GradReverse(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``-scale`` backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class IntrinsicEncoder(nn.Module):
    """f_I: 1-D conv over the one-hot sequence (valid positions), ReLU, global max pool, linear -> z_I [B, d].

    The convolution is computed as unfold + matmul, which is several times faster than
    ``nn.Conv1d`` for these tiny shapes on CPU; ``conv_weight`` has Conv1d's layout [C, 4, k].
    """

    def __init__(self, d: int = 16, channels: int = 32, kernel: int = 9) -> None:
        super().__init__()
        self.kernel = kernel
        conv = nn.Conv1d(4, channels, kernel)  # for its initialisation
        self.conv_weight = nn.Parameter(conv.weight.detach().clone())
        self.conv_bias = nn.Parameter(conv.bias.detach().clone())
        self.proj = nn.Linear(channels, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _ = x.shape
        patches = x.unfold(2, self.kernel, 1).permute(0, 2, 1, 3).reshape(b, -1, c * self.kernel)  # [B, P, 4k]
        h = patches @ self.conv_weight.reshape(self.conv_weight.shape[0], -1).t() + self.conv_bias
        return self.proj(F.relu(h).amax(dim=1))


class EnvironmentEncoder(nn.Module):
    """f_E: MLP over the cell-line context vector -> z_E [B, d]."""

    def __init__(self, context_dim: int, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(context_dim, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(c)


@dataclass
class ModelOutput:
    z_I: torch.Tensor
    z_E: torch.Tensor
    u: torch.Tensor        # U_I [B]
    r: torch.Tensor        # R_E [B]
    energy: torch.Tensor   # pre-temperature energy [B]
    logits: torch.Tensor   # energy / T [B]: p = sigmoid(logits)


class DecouplingModel(nn.Module):
    """The dual-stream energy model. ``interaction``/``learn_temperature`` switch the remedies."""

    def __init__(self, context_dim: int, n_lines: int, d_I: int = 16, d_E: int = 16,
                 interaction: bool = False, learn_temperature: bool = False) -> None:
        super().__init__()
        self.f_I = IntrinsicEncoder(d_I)
        self.f_E = EnvironmentEncoder(context_dim, d_E)
        self.head_U = nn.Linear(d_I, 1)
        self.head_R = nn.Linear(d_E, 1)
        self.adv_head = nn.Linear(d_I, n_lines)
        self.interaction = interaction
        self.lam = nn.Parameter(torch.zeros(())) if interaction else None
        self.temperature = LearnableTemperature(1.0) if learn_temperature else None
        self.register_buffer("prototypes", torch.zeros(n_lines, d_E))
        self.register_buffer("proto_seen", torch.zeros(n_lines, dtype=torch.bool))

    @property
    def T(self) -> torch.Tensor:
        return self.temperature() if self.temperature is not None else torch.ones(())

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every loss competes for: the two encoders."""
        return list(self.f_I.parameters()) + list(self.f_E.parameters())

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> ModelOutput:
        z_I = self.f_I(x)
        z_E = self.f_E(context)
        u = self.head_U(z_I).squeeze(1)
        r = self.head_R(z_E).squeeze(1)
        energy = interaction_energy(u, r, self.lam) if self.interaction else u - r
        logits = energy / self.T
        return ModelOutput(z_I, z_E, u, r, energy, logits)

    @torch.no_grad()
    def update_prototypes(self, z_E: torch.Tensor, lines: torch.Tensor, momentum: float = PROTO_MOMENTUM) -> None:
        """p_c <- mu p_c + (1 - mu) mean(z_E of c) for every training line c in the batch (first sight: the mean)."""
        for c in torch.unique(lines).tolist():
            mean = z_E[lines == c].mean(0)
            if bool(self.proto_seen[c]):
                self.prototypes[c].mul_(momentum).add_((1 - momentum) * mean)
            else:
                self.prototypes[c].copy_(mean)
                self.proto_seen[c] = True


def build_model(data: DecouplingData, variant: str, disable: frozenset[str] = frozenset()) -> DecouplingModel:
    fixed = variant == "fixed"
    return DecouplingModel(data.context_dim, len(data.train_cells),
                           interaction=fixed and "interaction" not in disable,
                           learn_temperature=fixed and "temperature" not in disable)


# --------------------------------------------------------------------------------------------
# losses, evaluation and the probe's watches


def same_group_partner(groups: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each row, the index of a *different* row of the same group (random, a derangement
    within every group of >= 2 rows; a row alone in its group is its own partner)."""
    partner = torch.arange(len(groups))
    for g in torch.unique(groups).tolist():
        idx = torch.nonzero(groups == g).flatten()
        if len(idx) > 1:
            idx = idx[torch.randperm(len(idx), generator=gen)]
            partner[idx] = idx.roll(1)
    return partner


def compute_losses(model: DecouplingModel, out: ModelOutput, batch: dict,
                   fixed_on: set[str], memory: Optional[MemoryBank], aug_gen: torch.Generator
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The per-loss 0-dim tensors, the positives (second InfoNCE view), their contexts (for the
    memory bank) and the memory negatives used (``None`` without a memory)."""
    partner = same_group_partner(batch["line"], aug_gen)
    ctx = batch["context"][partner]
    pos_ctx = ctx + AUG_NOISE * torch.randn(ctx.shape, generator=aug_gen)
    positives = model.f_E(pos_ctx)
    negatives = None
    losses = {"task": F.binary_cross_entropy_with_logits(out.logits, batch["y"])}
    if "memory" in fixed_on:
        if memory is not None and len(memory) > 0:
            with torch.no_grad():  # past contexts, encoded by the current f_E: never stale
                negatives = F.normalize(model.f_E(memory.features), dim=1)
        losses["cont"] = info_nce(out.z_E, positives, TAU, memory=negatives, groups=batch["line"],
                                  memory_groups=memory.groups if negatives is not None else None)
    else:
        losses["cont"] = info_nce(out.z_E, positives, TAU)
    protos = model.prototypes[batch["line"]]
    losses["proto"] = (out.z_E - protos).pow(2).sum(1).mean()
    if "corr" in fixed_on:
        losses["orth"] = correlation_loss(out.z_I, out.z_E)
    else:
        b = out.z_I.shape[0]
        losses["orth"] = (out.z_I.t() @ out.z_E / b).pow(2).sum()
    adv_logits = model.adv_head(GradReverse.apply(out.z_I, 1.0))
    losses["adv"] = F.cross_entropy(adv_logits, batch["line"])
    if "l1" in fixed_on:
        losses["l1"] = l1_penalty(out.z_I, out.z_E)
    return losses, positives, pos_ctx, negatives


@torch.no_grad()
def evaluate(model: DecouplingModel, split: Split, batch_size: int = 2048) -> dict[str, float]:
    """Task loss (BCE) and accuracy of ``model`` on ``split``."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0.0
    for s in range(0, len(split), batch_size):
        out = model(split.x[s:s + batch_size], split.context[s:s + batch_size])
        y = split.y[s:s + batch_size]
        loss += float(F.binary_cross_entropy_with_logits(out.logits, y, reduction="sum"))
        correct += float(((out.logits > 0).float() == y).sum())
    model.train(was)
    return {"loss": loss / len(split), "accuracy": correct / len(split)}


def _make_probe(model, variant, out_dir: Path, probe_every: int, fixed_on: set[str], n_lines: int):
    roles = dict(ROLES)
    if "corr" in fixed_on:
        roles["orth"] = "decorrelation"
    if "l1" in fixed_on:
        roles["l1"] = "regularization"
    probe = Probe(model, shared=model.shared_parameters(), every=probe_every, run_file=str(out_dir / f"{variant}.gprobe"),
                  task="task", roles=roles, overwrite=True,
                  expect_groups_per_batch=n_lines if "mixed" in fixed_on else 1)
    probe.watch_latent("z_I", model.f_I)
    probe.watch_latent("z_E")
    probe.watch_prototypes("line", lambda: model.prototypes, latent="z_E")
    probe.watch_saturation("energy", temperature=lambda: float(model.T.detach()), terms=("U_I", "R_E"), target="y")
    probe.watch_contrastive("cont", temperature=TAU)
    return probe


# --------------------------------------------------------------------------------------------
# training


def train(variant: str = "failing", steps: int = DEFAULT_STEPS, seed: int = 0, out_dir: Path | str = "gradprobe-demo",
          probe_every: int = 10, progress: bool | Callable[[int], None] = True, disable: frozenset[str] = frozenset(),
          val_every: int = 25, balance_every: int = 10, data: Optional[DecouplingData] = None,
          use_probe: bool = True, num_threads: Optional[int] = 1) -> dict:
    """Train one variant of the record-22 model on the synthetic data; write the run and a checkpoint.

    Writes ``out_dir/<variant>.gprobe`` (when ``gradprobe.Probe`` is available and
    ``use_probe``) and ``out_dir/<variant>.ckpt`` = ``{"model": state_dict, "gradprobe":
    probe.state_dict() or None, ...}``. ``disable`` names remedies (see :data:`REMEDIES`) to
    switch off in the fixed variant (for ablations); it is ignored for ``failing``.
    Returns a summary dict (accuracies, the Bayes accuracy, final losses, timings, paths).

    ``num_threads``: torch intra-op threads while training (restored afterwards). The model is
    tiny, so one thread is fastest; more threads mostly spin, and on a busy machine they can
    make a step 10-40x slower. ``None`` leaves torch's setting alone.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(variant, steps, seed, out_dir, probe_every, progress, disable, val_every, balance_every,
                      data, use_probe)
    finally:
        torch.set_num_threads(previous_threads)


def _train(variant, steps, seed, out_dir, probe_every, progress, disable, val_every, balance_every, data,
           use_probe) -> dict:
    if variant not in ("failing", "fixed"):
        raise ValueError("variant must be 'failing' or 'fixed'")
    unknown = set(disable) - set(REMEDIES)
    if unknown:
        raise ValueError(f"unknown remedies {sorted(unknown)}; choose from {REMEDIES}")
    fixed_on = set(REMEDIES) - set(disable) if variant == "fixed" else set()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data = data if data is not None else make_data(seed)
    model = build_model(data, variant, frozenset(disable))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    cell_index = torch.full((data.n_cells,), -1, dtype=torch.long)
    cell_index[data.train_cells] = torch.arange(len(data.train_cells))
    train_line = cell_index[data.train.cell]  # training-line index 0..L-1: prototypes, adversary, groups
    sampler = CellBatchSampler(data.train.cell, BATCH_SIZE, seed=seed, mixed="mixed" in fixed_on)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    memory = MemoryBank(MEMORY_SIZE, data.context_dim, normalize=False) if "memory" in fixed_on else None
    balancer = GradNormBalancer(task="task", targets=BALANCE_TARGETS, ema=0.8, min_w=1e-3, max_w=1e3,
                                init=dict(FAILING_WEIGHTS)) if "balance" in fixed_on else None
    probe = _make_probe(model, variant, out_dir, probe_every, fixed_on, len(data.train_cells)) if use_probe else None
    shared = model.shared_parameters()

    history: list[dict] = []
    weights = dict(FAILING_WEIGHTS)
    step = 0
    last_losses: dict[str, float] = {}
    while step < steps:
        for idx in sampler:
            if step >= steps:
                break
            idx_t = torch.from_numpy(idx)
            batch = {"x": data.train.x[idx_t], "y": data.train.y[idx_t], "line": train_line[idx_t],
                     "context": data.train.context[idx_t]}
            out = model(batch["x"], batch["context"])
            losses, positives, pos_ctx, negatives = compute_losses(model, out, batch, fixed_on,
                                                                   memory, aug_gen)

            report_step = step % val_every == 0 or step == steps - 1
            if balancer is not None and step % balance_every == 0:
                # unweighted per-loss gradient norms on the encoders (graph kept for the backward)
                norms = grad_norms(losses, shared)
                balancer.update({k: v for k, v in norms.items() if k in ("task", *FAILING_WEIGHTS)})
            weights = dict(balancer.weights) if balancer is not None else dict(FAILING_WEIGHTS)
            if "l1" in fixed_on:
                weights["l1"] = L1_WEIGHT
            if "curriculum" in fixed_on:
                ramp = linear_ramp(step, int(CURRICULUM_START * steps), int(CURRICULUM_RAMP * steps))
                weights = {k: w * ramp for k, w in weights.items()}

            if probe is not None:
                if memory is not None:  # what info_nce used: memory negatives, same-line ones masked
                    cont = {"anchors": out.z_E, "positives": positives,
                            "negatives": negatives if negatives is not None else out.z_E.new_zeros(0, out.z_E.shape[1]),
                            "negative_groups": memory.groups if negatives is not None else None,
                            "mask_same_group": True}
                else:
                    cont = (out.z_E, positives)
                probe.observe(z_E=out.z_E, energy=out.logits, U_I=out.u, R_E=out.r, groups=batch["line"], y=batch["y"],
                              cont=cont)
                total = probe.backward(losses, weights=weights)
            else:
                total = losses["task"] + sum(weights[k] * losses[k] for k in losses if k != "task")
                total.backward()
                total = total.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_prototypes(out.z_E.detach(), batch["line"])
            if memory is not None:
                memory.push(pos_ctx, batch["line"])
            last_losses = {k: float(v.detach()) for k, v in losses.items()}

            if report_step:
                val = evaluate(model, data.val)
                if probe is not None:
                    probe.log(val_task=val["loss"], val_accuracy=val["accuracy"])
                history.append({"step": step, "total": float(total), **last_losses, "val_task": val["loss"],
                                "val_accuracy": val["accuracy"], **{f"w_{k}": v for k, v in weights.items()}})
                if progress is True:
                    # The gradient balance as the probe last measured it (the run file has all of it).
                    norms = probe.last_grad_norms if probe is not None else None
                    balance = "" if not norms else "  |w*grad|/|grad task| " + " ".join(
                        f"{k} {weights.get(k, 1.0) * v / max(norms['task'], 1e-12):.2g}"
                        for k, v in norms.items() if k != "task")
                    print(f"[{variant}] step {step:4d}  task {last_losses['task']:.3f}  val {val['loss']:.3f}  "
                          f"cont {last_losses['cont']:.3f}  proto {last_losses['proto']:.3g}  "
                          f"orth {last_losses['orth']:.3g}  adv {last_losses['adv']:.3f}{balance}", flush=True)
            step += 1
            if callable(progress):
                progress(1)
    train_time = time.perf_counter() - t0

    val = evaluate(model, data.val)
    held = evaluate(model, data.heldout)
    tr = evaluate(model, data.train)
    probe_state = None
    run_path = None
    if probe is not None:
        probe_state = probe.state_dict() if hasattr(probe, "state_dict") else None
        probe.close()
        run_path = str(out_dir / f"{variant}.gprobe")
    ckpt_path = out_dir / f"{variant}.ckpt"
    torch.save({"model": model.state_dict(), "gradprobe": probe_state, "variant": variant, "seed": seed,
                "steps": steps, "disable": sorted(disable),
                "balancer": balancer.state_dict() if balancer is not None else None}, ckpt_path)
    result = {
        "variant": variant, "steps": steps, "seed": seed, "disabled": sorted(disable),
        "remedies": sorted(fixed_on),
        "run_path": run_path, "ckpt_path": str(ckpt_path),
        "heldout_accuracy": held["accuracy"], "val_accuracy": val["accuracy"], "train_accuracy": tr["accuracy"],
        "heldout_loss": held["loss"], "val_loss": val["loss"], "train_loss": tr["loss"],
        "bayes_accuracy": data.heldout.bayes_accuracy, "bayes_val_accuracy": data.val.bayes_accuracy,
        "final_losses": last_losses, "final_weights": weights,
        "temperature": float(model.T.detach()), "lam": float(model.lam.detach()) if model.lam is not None else None,
        "train_seconds": train_time, "history": history,
    }
    if progress is True:
        print(f"[{variant}] done in {train_time:.1f}s: held-out acc {held['accuracy']:.3f}, val acc "
              f"{val['accuracy']:.3f} (Bayes {data.heldout.bayes_accuracy:.3f} held-out, "
              f"{data.val.bayes_accuracy:.3f} val)", flush=True)
    return result
