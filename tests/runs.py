"""Small seeded training runs recorded with the real Probe, one family per failure mode.

Each builder trains a tiny model on CPU (a second or two) with ``gradprobe.Probe`` attached
and returns the recorded :class:`gradprobe.record.Run`. A ``bad``/``mode`` argument switches
the one mechanism record-22 describes; everything else stays the same, so the healthy
counterpart differs only in that mechanism. Results are cached per process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from gradprobe.demo.decoupling import GradReverse
from gradprobe.record import Run, run_from_state
from gradprobe.remedies import GradNormBalancer, correlation_loss, info_nce


def _cached(builder):
    """Cache a builder per process and run it on one thread: these models are tiny, and
    intra-op threads only add contention on a busy CI machine."""

    @functools.lru_cache(maxsize=None)
    @functools.wraps(builder)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return builder(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


def _finish(probe: Probe, name: str) -> Run:
    probe.close()
    return run_from_state(probe.state_dict(), name)


def _setup(seed: int):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def numpy_rankme(z: np.ndarray) -> float:
    """Centred RankMe (Garrido et al. 2023) with numpy alone: the truth a test checks the
    probe's collapse findings against, computed without gradprobe."""
    s = np.linalg.svd(z - z.mean(0), compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def log_rank_truth(probe: Probe, module: nn.Module, batch: torch.Tensor) -> None:
    """Log the numpy centred RankMe of ``module``'s output on a fixed batch (in eval mode), and
    that of a standard Gaussian sample of the same shape (the isotropic reference), as
    ``rankme_numpy`` and ``rankme_numpy_isotropic``."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        z = module(batch).double().numpy()
    module.train(was_training)
    gaussian = np.random.default_rng(0).standard_normal(z.shape)
    probe.log(rankme_numpy=numpy_rankme(z), rankme_numpy_isotropic=numpy_rankme(gaussian))


# -------------------------------------------------------------- gradient-swamping (100x)

@_cached
def two_task_regression(balanced: bool, steps: int = 120, seed: int = 0) -> Run:
    """Two regression tasks on one trunk whose targets differ in scale by 100x.

    Equal weights: 'small''s gradient on the trunk is ~1% of 'big''s. ``balanced``: weights
    from the recorded gradient norms (GradNormBalancer, updated each probe step).
    """
    gen = _setup(seed)
    x = torch.randn(512, 8, generator=gen)
    a, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    y_big = 100.0 * torch.sin(x @ a)
    y_small = torch.cos(x @ b)
    trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
    head_big, head_small = nn.Linear(32, 1), nn.Linear(32, 1)
    model = nn.ModuleDict(dict(trunk=trunk, big=head_big, small=head_small))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = Probe(model, shared=trunk, every=2, task="big", roles={"small": "task"})
    balancer = GradNormBalancer(task="big") if balanced else None
    weights = {"big": 1.0, "small": 1.0}
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        h = trunk(x[idx])
        losses = {"big": F.mse_loss(head_big(h).squeeze(1), y_big[idx]),
                  "small": F.mse_loss(head_small(h).squeeze(1), y_small[idx])}
        probe.backward(losses, weights=weights)
        opt.step()
        opt.zero_grad()
        if balancer is not None and probe.last_grad_norms and step % 2 == 0:
            weights = {"big": 1.0, **balancer.update(probe.last_grad_norms)}
    return _finish(probe, f"two_task_balanced={balanced}")


# ------------------------------------------------- constraint-neglect (memorised task)

@_cached
def memorising_decoupler(bad: bool, steps: int = 200, seed: int = 0) -> Run:
    """A classifier memorising 32 random labels through two latents z_I, z_E.

    ``bad``: the record's strict orthogonality ||z_I^T z_E||^2 with a small fixed weight
    (1e-5), which the memorisation overruns. Healthy: the scale-free correlation loss with
    weight 1.0, which keeps falling.
    """
    gen = _setup(seed)
    x = torch.randn(32, 16, generator=gen)
    y = (torch.rand(32, generator=gen) > 0.5).float()
    trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
    f_I, f_E, head = nn.Linear(64, 4), nn.Linear(64, 4), nn.Linear(8, 1)
    model = nn.ModuleList([trunk, f_I, f_E, head])
    # Plain SGD: the loss weights act as written (Adam would rescale a lone small gradient).
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = Probe(model, shared=trunk, every=4, roles={"orth": "orthogonality"})
    probe.watch_latent("z_I")
    probe.watch_latent("z_E")
    for step in range(steps):
        h = trunk(x)
        z_I, z_E = f_I(h), f_E(h)
        logit = head(torch.cat([z_I, z_E], 1)).squeeze(1)
        orth = (z_I.T @ z_E).pow(2).sum() / len(x) ** 2 if bad else correlation_loss(z_I, z_E)
        losses = {"task": F.binary_cross_entropy_with_logits(logit, y), "orth": orth}
        probe.observe(z_I=z_I, z_E=z_E)
        probe.backward(losses, weights={"orth": 1e-5 if bad else 1.0})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"memorising_bad={bad}")


# ---------------------------------------------------- gradient-conflict (gradient reversal)

@_cached
def domain_adversarial(reversal: bool, steps: int = 120, seed: int = 0) -> Run:
    """The task needs the group (y depends on it) while a domain classifier on the same
    features is trained through gradient reversal to remove it: the two gradients oppose.
    Healthy counterpart: the same classifier without reversal (an auxiliary group head)."""
    gen = _setup(seed)
    n, groups = 512, 4
    grp = torch.randint(0, groups, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen) + F.one_hot(grp, 8).float() * 2.0
    y = grp.float() + 0.1 * torch.randn(n, generator=gen)
    trunk = nn.Sequential(nn.Linear(8, 2), nn.Tanh())  # a narrow shared feature both contest
    head, disc = nn.Linear(2, 1), nn.Linear(2, groups)
    model = nn.ModuleList([trunk, head, disc])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    probe = Probe(model, shared=trunk, every=2, roles={"adv": "adversarial"})
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        h = trunk(x[idx])
        feats = GradReverse.apply(h, 1.0) if reversal else h
        losses = {"task": F.mse_loss(head(h).squeeze(1), y[idx]),
                  "adv": F.cross_entropy(disc(feats), grp[idx])}
        probe.backward(losses, weights={"adv": 1.0})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"domain_adversarial_reversal={reversal}")


# ---------------------------- representation-collapse / orthogonality-vanishing (latent)

@_cached
def shrinking_latent(mode: str, steps: int = 120, seed: int = 0) -> Run:
    """A regression model whose watched latent z (dim 8) feeds the head through a map that
    changes during training: ``"rank1"`` projects z progressively onto one direction (rank
    collapse), ``"vanish"`` multiplies it by a factor shrinking to 0.005 (norm collapse, with an
    unnormalised orthogonality loss against a second latent), ``"offset"`` adds a common
    offset growing to 20 (its mean drifts, its spread is unchanged: no collapse; its
    directions, watched as ``z_dir``, do collapse to one point), ``"healthy"`` leaves it alone.
    """
    gen = _setup(seed)
    x = torch.randn(512, 12, generator=gen)
    y = torch.tanh(x[:, :4]).sum(1)
    enc = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 8))
    enc2 = nn.Linear(12, 8)
    head = nn.Linear(16, 1)
    model = nn.ModuleList([enc, enc2, head])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    probe = Probe(model, shared=enc, every=2, roles={"orth": "orthogonality"})
    probe.watch_latent("z")
    probe.watch_latent("w")
    if mode == "offset":
        probe.watch_latent("z_dir")  # what a cosine loss on z would see
    u = F.normalize(torch.randn(8, generator=gen), dim=0)
    for step in range(steps):
        t = min(1.0, step / (0.7 * steps))
        idx = torch.randint(0, 512, (64,), generator=gen)
        z = enc(x[idx])
        if mode == "rank1":
            a = t
            z = (1 - a) * z + a * (z @ u)[:, None] * u[None, :]
        elif mode == "vanish":
            z = z * (1.0 - t * 0.995)
        elif mode == "offset":
            z = z + 20.0 * t * u[None, :]
        w = enc2(x[idx])
        losses = {"task": F.mse_loss(head(torch.cat([z, w], 1)).squeeze(1), y[idx]),
                  "orth": (z.T @ w).pow(2).sum() / len(idx) ** 2}
        probe.observe(z=z, w=w, **({"z_dir": F.normalize(z, dim=1)} if mode == "offset" else {}))
        probe.backward(losses, weights={"orth": 1.0})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"shrinking_latent_{mode}")


# ------------------------ weak-contrastive-signal / batch-composition-mismatch (batches)

@_cached
def contrastive_batches(batches: str, expect: int | None, steps: int = 100,
                        seed: int = 0) -> Run:
    """InfoNCE between two noisy views of 4 groups of data. ``batches="single"``: each batch
    holds one group (the record's CellBatchSampler); ``"mixed"``: random batches; ``"pairs"``:
    each batch holds two of the four groups (a class-sorted loader read in order)."""
    gen = _setup(seed)
    n, groups = 512, 4
    grp = torch.randint(0, groups, (n,), generator=gen)
    centres = 3.0 * torch.randn(groups, 16, generator=gen)
    x = centres[grp] + torch.randn(n, 16, generator=gen)
    y = x[:, 0]
    enc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    head = nn.Linear(8, 1)
    model = nn.ModuleList([enc, head])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    probe = Probe(model, shared=enc, every=2, expect_groups_per_batch=expect)
    probe.watch_contrastive("cont", temperature=0.1)
    by_group = [torch.nonzero(grp == k).squeeze(1) for k in range(groups)]
    for step in range(steps):
        if batches in ("single", "pairs"):
            held = [step % groups] + ([(step + 1) % groups] if batches == "pairs" else [])
            pool = torch.cat([by_group[k] for k in held])
            idx = pool[torch.randint(0, len(pool), (32,), generator=gen)]
        else:
            idx = torch.randint(0, n, (32,), generator=gen)
        xa = x[idx] + 0.3 * torch.randn(32, 16, generator=gen)
        xb = x[idx] + 0.3 * torch.randn(32, 16, generator=gen)
        za, zb = enc(xa), enc(xb)
        losses = {"task": F.mse_loss(head(za).squeeze(1), y[idx]),
                  "cont": info_nce(za, zb, temperature=0.1)}
        probe.observe(cont=(za, zb), groups=grp[idx])
        probe.backward(losses, weights={"cont": 0.5})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"contrastive_{batches}_expect={expect}")


# ------------------------------------------- prototype-stale / prototype-collapse

@_cached
def prototype_model(update: str, steps: int = 100, seed: int = 0) -> Run:
    """Environment features z_E of 4 groups pulled towards per-group prototypes (L_proto).

    ``update``: ``"momentum"`` (p_g <- 0.9 p_g + 0.1 mean(z_E of group g), every step, as in
    the record), ``"never"`` (the update is never called), ``"batch_mean"`` (every prototype
    is updated with the mean of the whole batch: the momentum-average trap, all converge).
    """
    gen = _setup(seed)
    n, groups = 512, 4
    grp = torch.randint(0, groups, (n,), generator=gen)
    centres = 2.0 * torch.randn(groups, 12, generator=gen)
    x = centres[grp] + torch.randn(n, 12, generator=gen)
    y = x[:, :3].sum(1)
    enc = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 8))
    head = nn.Linear(8, 1)
    model = nn.ModuleList([enc, head])
    protos = torch.randn(groups, 8, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    probe = Probe(model, shared=enc, every=2)
    probe.watch_latent("z_E")
    probe.watch_prototypes("proto", lambda: protos, latent="z_E")
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        z = enc(x[idx])
        g = grp[idx]
        losses = {"task": F.mse_loss(head(z).squeeze(1), y[idx]),
                  "proto": ((z - protos[g]) ** 2).sum(1).mean()}
        probe.observe(z_E=z, groups=g)
        probe.backward(losses, weights={"proto": 0.1})
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            if update == "momentum":
                for c in g.unique():
                    protos[c] = 0.9 * protos[c] + 0.1 * z[g == c].mean(0)
            elif update == "batch_mean":
                protos.mul_(0.9).add_(0.1 * z.mean(0))
    return _finish(probe, f"prototypes_{update}")


# ------------------------------------------------------------------ latent-dependence

@_cached
def two_latents(dependent: bool, steps: int = 80, seed: int = 0) -> Run:
    """z_I from the sequence x, z_E from the context c. ``dependent``: z_E is a linear
    function of z_I (the environment encoder reads the sequence features); healthy: z_E sees
    only c, which is independent of x. A decorrelation loss is present in both."""
    gen = _setup(seed)
    n = 512
    x, c = torch.randn(n, 10, generator=gen), torch.randn(n, 6, generator=gen)
    y = torch.tanh(x[:, 0]) + torch.tanh(c[:, 0])
    f_I = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 6))
    f_E = nn.Linear(6, 6, bias=False) if dependent else nn.Sequential(nn.Linear(6, 16),
                                                                        nn.Tanh(), nn.Linear(16, 6))
    head = nn.Linear(12, 1)
    model = nn.ModuleList([f_I, f_E, head])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    probe = Probe(model, shared=f_I, every=2, roles={"corr": "decorrelation"})
    probe.watch_latent("z_I")
    probe.watch_latent("z_E")
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        z_I = f_I(x[idx])
        z_E = f_E(z_I) if dependent else f_E(c[idx])
        losses = {"task": F.mse_loss(head(torch.cat([z_I, z_E], 1)).squeeze(1), y[idx]),
                  "corr": correlation_loss(z_I, z_E)}
        probe.observe(z_I=z_I, z_E=z_E)
        probe.backward(losses, weights={"corr": 0.1})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"two_latents_dependent={dependent}")


# ----------------------------------------------------------------- sigmoid-saturation

@_cached
def energy_logistic(scale: float, steps: int = 80, seed: int = 0) -> Run:
    """p = sigmoid((U - R) / T) with T = 1 fixed; U is ``scale`` times a linear energy."""
    gen = _setup(seed)
    n = 512
    x = torch.randn(n, 8, generator=gen)
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=gen)) > 0).float()
    u_net, r_net = nn.Linear(8, 1), nn.Linear(8, 1)
    model = nn.ModuleList([u_net, r_net])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = Probe(model, shared=u_net, every=2, roles={"l2": "regularization"})
    probe.watch_saturation("energy", temperature=1.0, terms=("U", "R"), target="label")
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        u = scale * u_net(x[idx]).squeeze(1)
        r = r_net(x[idx]).squeeze(1)
        logit = (u - r) / 1.0
        losses = {"task": F.binary_cross_entropy_with_logits(logit, y[idx]),
                  "l2": u_net.weight.pow(2).sum()}
        probe.observe(energy=logit, U=u, R=r, label=y[idx])
        probe.backward(losses, weights={"l2": 1e-4})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"energy_logistic_scale={scale}")


# ------------------------------------------------------------------------ overfitting

@_cached
def memorise_noisy(n_train: int, steps: int = 240, seed: int = 0) -> Run:
    """An MLP on ``n_train`` samples with 30% flipped labels; validation BCE on 512 held-out
    samples logged every 6 steps as 'val_task' (and accuracy as 'val_accuracy'). 16 samples:
    memorised, validation loss rises."""
    gen = _setup(seed)
    w_true = torch.randn(16, generator=gen)

    def data(n):
        x = torch.randn(n, 16, generator=gen)
        y = (x @ w_true > 0).float()
        flip = torch.rand(n, generator=gen) < 0.3
        return x, torch.where(flip, 1 - y, y)

    x, y = data(n_train)
    xv, yv = data(512)
    trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
    head = nn.Linear(64, 1)
    model = nn.ModuleList([trunk, head])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = Probe(model, shared=trunk, every=3, roles={"l2": "regularization"})
    for step in range(steps):
        idx = torch.randint(0, n_train, (min(64, n_train),), generator=gen)
        logit = head(trunk(x[idx])).squeeze(1)
        losses = {"task": F.binary_cross_entropy_with_logits(logit, y[idx]),
                  "l2": sum(p.pow(2).sum() for p in trunk.parameters())}
        probe.backward(losses, weights={"l2": 1e-5})
        opt.step()
        opt.zero_grad()
        if step % 6 == 0:
            with torch.no_grad():
                val_logit = head(trunk(xv)).squeeze(1)
                val = F.binary_cross_entropy_with_logits(val_logit, yv)
                accuracy = ((val_logit > 0).float() == yv).float().mean()
            probe.log(val_task=val, val_accuracy=accuracy)
    return _finish(probe, f"memorise_noisy_{n_train}")


# ---------------------------------------------------------- inert-loss / non-finite

@_cached
def wiring(mode: str, steps: int = 40, seed: int = 0) -> Run:
    """Three losses on one encoder. ``"detached"``: 'aux' is computed from z.detach() (it
    trains nothing); ``"nan"``: from step 20 'aux' overflows to Inf (its input is scaled by
    1e30); ``"healthy"``: wired normally."""
    gen = _setup(seed)
    x = torch.randn(256, 8, generator=gen)
    y = x[:, 0] - x[:, 1]
    enc = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
    head, head2 = nn.Linear(16, 1), nn.Linear(16, 1)
    model = nn.ModuleList([enc, head, head2])
    target = torch.tanh(x[:, 3])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    probe = Probe(model, shared=enc, every=2, roles={"aux": "reconstruction"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe warns about the failures it records
        for step in range(steps):
            idx = torch.randint(0, 256, (32,), generator=gen)
            z = enc(x[idx])
            src = z.detach() if mode == "detached" else z
            scale = 1e30 if mode == "nan" and step >= 20 else 1.0
            losses = {"task": F.mse_loss(head(z).squeeze(1), y[idx]),
                      "rec": F.mse_loss(head2(z).squeeze(1), x[idx, 2]),
                      "aux": F.mse_loss((src * scale).mean(1), target[idx])}
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
        # Closing warns too: the "nan" run's parameters hold Inf when the probe closes.
        return _finish(probe, f"wiring_{mode}")


@_cached
def sigmoid_head(loss: str, steps: int = 80, seed: int = 0) -> Run:
    """Six sigmoid outputs (multi-label, each label on for about half the samples), three of
    them started saturated at "off" (bias -15). ``"mse"``: MSE on the probabilities, whose
    gradient at a saturated wrong output is ~sigmoid'(x) ~ 3e-7, so those outputs stay
    wrong; ``"bce"``: cross-entropy on the logits, whose gradient there is sigmoid(x) - y."""
    gen = _setup(seed)
    n = 512
    x = torch.randn(n, 8, generator=gen)
    y = (x @ torch.randn(8, 6, generator=gen) > 0).float()
    trunk, head = nn.Linear(8, 16), nn.Linear(16, 6)
    with torch.no_grad():
        head.bias[:3] = -15.0
    model = nn.ModuleList([trunk, head])
    # Plain SGD: an adaptive optimiser would rescale the vanishing gradient back up.
    opt = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9)
    probe = Probe(model, every=2, roles={"l2": "regularization"})
    probe.watch_saturation("out", target="label")
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        logit = head(torch.tanh(trunk(x[idx])))
        fit = F.mse_loss(torch.sigmoid(logit), y[idx]) if loss == "mse" else \
            F.binary_cross_entropy_with_logits(logit, y[idx])
        losses = {"fit": fit, "l2": head.weight.pow(2).sum()}
        probe.observe(out=logit, label=y[idx])
        probe.backward(losses, weights={"l2": 1e-4})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"sigmoid_head_{loss}")


@_cached
def pairwise_sigmoid(frozen: bool, steps: int = 120, seed: int = 0) -> Run:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1) between two noisy views
    of 128 points drawn from 16 clusters, one linear tower each: the positives are the 128
    diagonal logits of 16,384. Published: t' = log 10 and bias -10, both learnt. ``frozen``:
    the temperature fixed at 1000 and the bias at 0, so the n - 1 negatives of each row push
    every pair below 0, the positives with them."""
    gen = _setup(seed)
    centres = 3.0 * torch.randn(16, 8, generator=gen)
    towers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(8, 16)])
    t_prime = nn.Parameter(torch.tensor(math.log(1000.0 if frozen else 10.0)),
                           requires_grad=not frozen)
    bias = nn.Parameter(torch.tensor(0.0 if frozen else -10.0), requires_grad=not frozen)
    opt = torch.optim.Adam([*towers.parameters(), t_prime, bias], lr=1e-2)
    probe = Probe(towers, every=4)
    probe.watch_saturation("logits", target="pairs", temperature=lambda: t_prime.exp())
    eye = torch.eye(128)
    for _ in range(steps):
        x = centres[torch.randint(0, 16, (128,), generator=gen)]
        za, zb = (F.normalize(tower(x + 0.5 * torch.randn(x.shape, generator=gen)), dim=1)
                  for tower in towers)
        logits = za @ zb.T * t_prime.exp() + bias
        loss = -F.logsigmoid((2 * eye - 1) * logits).sum() / 128
        probe.observe(logits=logits, pairs=eye)
        probe.backward({"siglip": loss})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"pairwise_sigmoid_{frozen}")


# ------------------------------------------- the shared set at defaults (DANN, VAE)

@_cached
def dann(domain_input: str, steps: int = 60, seed: int = 0) -> Run:
    """Domain-adversarial training as in fungtion/DANN: one feature extractor applied to a
    source and a target batch, a label head on the source features, one domain head on both
    through gradient reversal; losses 'label', 's_domain', 't_domain'; the probe infers the
    shared set. ``domain_input="detached"``: the domain head reads ``feature.detach()``, so
    the domain losses share nothing with the label loss (the adversary trains nothing in
    the features): a wiring bug."""
    gen = _setup(seed)
    n, classes = 512, 4
    ys = torch.randint(0, classes, (n,), generator=gen)
    centres = 2.0 * torch.randn(classes, 10, generator=gen)
    xs = centres[ys] + torch.randn(n, 10, generator=gen)
    xt = centres[torch.randint(0, classes, (n,), generator=gen)] + \
        torch.randn(n, 10, generator=gen) + 1.5  # the shifted target domain
    feature = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(),
                            nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU())
    label_head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes))
    domain_head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    model = nn.ModuleDict(dict(feature=feature, label=label_head, domain=domain_head))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = Probe(model, every=2)
    detach = domain_input == "detached"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe warns about the wiring it records
        for step in range(steps):
            idx = torch.randint(0, n, (32,), generator=gen)
            fs, ft = feature(xs[idx]), feature(xt[idx])
            alpha = 2.0 / (1.0 + math.exp(-10 * step / steps)) - 1.0
            ds, dt = ((f.detach() if detach else GradReverse.apply(f, alpha)) for f in (fs, ft))
            losses = {"label": F.cross_entropy(label_head(fs), ys[idx]),
                      "s_domain": F.cross_entropy(domain_head(ds), torch.zeros(32, dtype=torch.long)),
                      "t_domain": F.cross_entropy(domain_head(dt), torch.ones(32, dtype=torch.long))}
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
    return _finish(probe, f"dann_{domain_input}")


class _VAE(nn.Module):
    """pytorch/examples vae/main.py, scaled down: fc1 -> fc21 (mu) / fc22 (logvar) ->
    reparameterise -> fc3 -> fc4 -> sigmoid."""

    def __init__(self, d: int = 32, hidden: int = 64, latent: int = 8):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, hidden), nn.Linear(hidden, latent), \
            nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


@_cached
def vae(beta: float, steps: int = 300, seed: int = 0) -> Run:
    """A VAE on 32-pixel binary images drawn from 4 latent factors, losses 'bce' (summed
    over pixels, as in the example) and 'kld' with weight ``beta``. beta 1 learns; beta 50
    pushes every unit of the posterior to the prior (posterior collapse: no active unit).
    Watched as the docs say: the posterior mean, and the decoder's logits (the output of
    fc4, which ``torch.sigmoid`` then reads) against the pixels they reconstruct."""
    gen = _setup(seed)
    n = 1024
    factors = torch.randn(n, 4, generator=gen)
    x = (torch.sigmoid(3.0 * factors @ torch.randn(4, 32, generator=gen)) >
         torch.rand(n, 32, generator=gen)).float()
    model = _VAE()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = Probe(model, every=5)
    probe.watch_latent("mu", model.fc21)
    probe.watch_saturation("pixels", model.fc4, target="x")
    for step in range(steps):
        idx = torch.randint(0, n, (128,), generator=gen)
        recon, mu, logvar = model(x[idx])
        losses = {"bce": F.binary_cross_entropy(recon, x[idx], reduction="sum") / len(idx),
                  "kld": -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(idx)}
        probe.observe(x=x[idx])
        probe.backward(losses, weights={"kld": beta})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"vae_beta={beta}")


# ------------------------------------------------ collapse without negatives (SimSiam)

@_cached
def simsiam(stop_gradient: bool, steps: int = 150, seed: int = 0, span: int = 8,
            out: int = 32) -> Run:
    """SimSiam (Chen & He 2021; facebookresearch/simsiam builder.py) on two noisy views of
    32-dim data spanning ``span`` directions: encoder with a BN projector to ``out``
    dimensions, a bottleneck predictor, loss -(cos(p1, z2) + cos(p2, z1)) / 2. Without the
    stop-gradient on z the outputs collapse to a few directions (the paper's Fig. 2). The
    numpy RankMe of the outputs on a fixed batch is logged before and after training
    (:func:`log_rank_truth`)."""
    gen = _setup(seed)
    n = 1024
    x = torch.randn(n, span, generator=gen) @ torch.randn(span, 32, generator=gen)
    # The projector's output layer ends in a BatchNorm without affine parameters, as in the
    # reference builder, so the outputs cannot shrink to a point: collapse is dimensional.
    encoder = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(),
                            nn.Linear(64, out, bias=False), nn.BatchNorm1d(out, affine=False))
    predictor = nn.Sequential(nn.Linear(out, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, out))
    model = nn.ModuleDict(dict(encoder=encoder, predictor=predictor))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    probe = Probe(model, every=5)
    probe.watch_latent("z", encoder)
    held = x[:128]
    log_rank_truth(probe, encoder, held)
    for step in range(steps):
        idx = torch.randint(0, n, (128,), generator=gen)
        views = [x[idx] + 0.5 * torch.randn(128, 32, generator=gen) for _ in range(2)]
        z1, z2 = encoder(views[0]), encoder(views[1])
        p1, p2 = predictor(z1), predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
        loss = -(F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean()) / 2
        probe.backward({"simsiam": loss})
        opt.step()
        opt.zero_grad()
    log_rank_truth(probe, encoder, held)
    return _finish(probe, f"simsiam_stop_gradient={stop_gradient}_span={span}_out={out}")


# ----------------------------------------- a supervised latent (neural collapse geometry)

@_cached
def classifier(observe_labels: bool, steps: int = 300, seed: int = 0) -> Run:
    """A 10-class classifier whose 256-dim penultimate features are watched, trained with
    SGD and weight decay (the setting of Papyan et al. 2020) to a small loss: its features
    approach neural collapse, class means spanning classes - 1 = 9 directions and the
    within-class spread shrinking, so their rank falls far below the isotropic one. With
    ``observe_labels`` the watch sees the labels (``labels="y"``); otherwise it does not. The
    numpy RankMe of the features on a fixed batch is logged before and after training
    (:func:`log_rank_truth`)."""
    gen = _setup(seed)
    n, classes, width = 2048, 10, 256
    y = torch.randint(0, classes, (n,), generator=gen)
    x = 1.5 * torch.randn(classes, 20, generator=gen)[y] + torch.randn(n, 20, generator=gen)
    body = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    head = nn.Linear(width, classes)
    model = nn.ModuleList([body, head])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    probe = Probe(model, every=10)
    probe.watch_latent("features", body, labels="y" if observe_labels else None)
    held = x[:256]
    log_rank_truth(probe, body, held)
    for step in range(steps):
        idx = torch.randint(0, n, (256,), generator=gen)
        if observe_labels:
            probe.observe(y=y[idx])
        probe.backward({"ce": F.cross_entropy(head(body(x[idx])), y[idx])})
        opt.step()
        opt.zero_grad()
    log_rank_truth(probe, body, held)
    return _finish(probe, f"classifier_labels={observe_labels}")


# --------------------------------------------------- a conflict that harms (and static weights)

@_cached
def opposed_targets(steps: int = 120, seed: int = 0, declared: bool = True) -> Run:
    """One shared output h asked by 'task' to equal y and by 'aux' (weight 3) to equal -y: the
    gradients oppose exactly; the heavier 'aux' wins, so 'aux' falls while 'task' rises (a
    conflict that harms the task, tragic: cos = -1 with unequal magnitudes). ``declared``:
    the task's role is declared (``roles={"task": "task"}``), else it is the first loss."""
    gen = _setup(seed)
    n = 512
    x = torch.randn(n, 8, generator=gen)
    y = torch.tanh(x @ torch.randn(8, generator=gen))
    trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(trunk.parameters(), lr=0.05)
    probe = Probe(trunk, every=2, **({"roles": {"task": "task"}} if declared else {}))
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        h = trunk(x[idx]).squeeze(1)
        losses = {"task": F.mse_loss(h, y[idx]), "aux": F.mse_loss(h, -y[idx])}
        probe.backward(losses, weights={"aux": 3.0})
        opt.step()
        opt.zero_grad()
    return _finish(probe, "opposed_targets")


@_cached
def left_right(weight_left: float, steps: int = 80, seed: int = 0) -> Run:
    """Two heads on one trunk as in the multi-digit LeNet of WeiChengTseng/Pytorch-PCGrad:
    'L' (the task, first loss) and 'R' classify two halves of the input; 'L' weighted
    ``weight_left``. At 1e-3 its gradient on the trunk is swamped by 'R''s. An L2 penalty
    'l2' on the left head only touches that head (a regulariser local by design)."""
    gen = _setup(seed)
    n, classes = 1024, 5
    yl, yr = (torch.randint(0, classes, (n,), generator=gen) for _ in range(2))
    centres = 2.0 * torch.randn(classes, 8, generator=gen)
    x = torch.cat([centres[yl], centres[yr]], 1) + torch.randn(n, 16, generator=gen)
    trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    left, right = nn.Linear(32, classes), nn.Linear(32, classes)
    model = nn.ModuleDict(dict(trunk=trunk, left=left, right=right))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = Probe(model, every=2)
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        h = trunk(x[idx])
        losses = {"L": F.cross_entropy(left(h), yl[idx]), "R": F.cross_entropy(right(h), yr[idx]),
                  "l2": left.weight.pow(2).sum()}
        probe.backward(losses, weights={"L": weight_left, "l2": 1e-4})
        opt.step()
        opt.zero_grad()
    return _finish(probe, f"left_right_weight={weight_left}")


# ---------------------------------------------------------------------- probe-incomplete

@dataclasses.dataclass
class Encoded:
    """A structured module output, as many libraries return (Hugging Face's ModelOutput...)."""

    z: torch.Tensor
    logits: torch.Tensor


class StructuredEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.cls = nn.Linear(16, 3)

    def forward(self, x):
        z = self.body(x)
        return Encoded(z=z, logits=self.cls(z))


@_cached
def structured_watch(select: str | None, steps: int = 40, seed: int = 0) -> Run:
    """A classifier and a regression head on an encoder that returns a dataclass, its latent
    watched from the encoder's output: ``select=None`` cannot read it (the watch is dropped),
    ``select="z"`` picks the latent."""
    gen = _setup(seed)
    x = torch.randn(256, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    encoder, head = StructuredEncoder(), nn.Linear(16, 1)
    model = nn.ModuleList([encoder, head])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    probe = Probe(model, shared=encoder.body, every=2)
    probe.watch_latent("z", encoder, select=select)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped watch's warning
        for step in range(steps):
            idx = torch.randint(0, 256, (32,), generator=gen)
            out = encoder(x[idx])
            losses = {"task": F.cross_entropy(out.logits, y[idx]),
                      "reg": F.mse_loss(head(out.z).squeeze(1), x[idx, 2])}
            probe.backward(losses)
            opt.step()
            opt.zero_grad()
    return _finish(probe, f"structured_watch_{select}")
