"""Wall time per training step with and without the probe, as ratios taken side by side.

Configurations, interleaved round by round (this machine is noisy), medians over rounds:

- plain: weighted sum of the losses and one ordinary backward;
- probe defaults: ``Probe(model)`` (the default schedule, measured past its dense start, at one
  probe step in 64 where a long run spends nearly all its steps; shared set inferred: nearest
  shared layer); what the dense start adds to a short run is printed from the every-step cost;
- probe every step: defaults with ``every=1``;
- probe every step, whole trunk: ``shared=trunk, every=1, assemble=True`` (exact per-loss
  gradients over the whole trunk, ``.grad`` assembled from them; the trunk's Linear and Conv
  layers, where the cost model says it pays, give their part of the Gram matrix from their
  inputs and per-loss output gradients and their ``.grad`` from one weight gradient,
  layer_inputs.py);
- probe every step, whole trunk, separate: ``shared=trunk, every=1`` (the ordinary backward
  fills ``.grad``; the same layer-input route for the Gram matrix);
- naive: one ``autograd.grad`` per loss over all parameters, then the ordinary backward;
- reference "forward + K backwards" (F+K*B): one ``autograd.grad`` per loss over all
  parameters and nothing else: what taking each loss's gradient alone costs;

``--peers``: the peer table instead, on the two small shapes: plain, forward + K backwards,
gradprobe's whole-trunk probe step (assembled) and TorchJD 0.18 (``mtl_backward`` on the
weighted losses, then ``jac_to_grad(trunk, Sum())``: the same ``.grad``, the trunk's Jacobian
in between; the column is left out, with a note, when torchjd is not importable), as
multiples of forward + K backwards.

After the timings: what one ``probe.findings()`` call costs on the run the every-step
configuration recorded, amortised over 500 plain steps (``Probe(findings_every=500)``).

Beside the ratios it prints what one step dispatches, counted with ``gradprobe.opcount``
(a ``TorchDispatchMode``, untimed): aten ops and host synchronisations (``.item()``-like
scalar reads, copies to the host, ops whose CUDA kernels wait for the device) of a probe step
and of a non-probe step, and where the probe step's synchronisations are asked for. On a CPU
run the copies to the host are counted where the same code would make them on a GPU.

Usage: python benchmarks/probe_overhead.py [--rounds 7] [--block 50] [--device cuda]
       [--shapes issue] [--counts-only | --no-counts] [--model conv|mlp] [--clock process]
       [--peers]
``--shapes issue``: the larger models of issue 13 (conv trunk batch 512, length 200, width 128;
MLP 1024-4096x3, batch 1024), the default with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.opcount import count_ops
from gradprobe.probe.cadence import MAX_DEFAULT_INTERVAL, is_probe_step


class ConvTwoLatent(nn.Module):
    """Conv trunk over one-hot-like sequences, two latents, task head (the record's shape)."""

    def __init__(self, channels=4, length=100, width=64, dim=32, groups=8):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv1d(channels, width, 9, padding=4), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(8))
        self.f_I = nn.Linear(width * 8, dim)
        self.f_E = nn.Linear(width * 8 + groups, dim)
        self.head = nn.Linear(2 * dim, 1)
        self.groups = groups

    def forward(self, x, g):
        h = self.trunk(x).flatten(1)
        z_I = self.f_I(h)
        z_E = self.f_E(torch.cat([h, F.one_hot(g, self.groups).float()], 1))
        return z_I, z_E, self.head(torch.cat([z_I, z_E], 1)).squeeze(1)


class WideMLP(nn.Module):
    def __init__(self, inp=512, width=1024, dim=128, groups=8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inp, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.f_I = nn.Linear(width, dim)
        self.f_E = nn.Linear(width + groups, dim)
        self.head = nn.Linear(2 * dim, 1)
        self.groups = groups

    def forward(self, x, g):
        h = self.trunk(x)
        z_I = self.f_I(h)
        z_E = self.f_E(torch.cat([h, F.one_hot(g, self.groups).float()], 1))
        return z_I, z_E, self.head(torch.cat([z_I, z_E], 1)).squeeze(1)


def losses_of(model, x, y, g, prototypes):
    z_I, z_E, logit = model(x, g)
    a, b = F.normalize(z_I, dim=1), F.normalize(z_E, dim=1)
    return {
        "task": F.binary_cross_entropy_with_logits(logit, y),
        "cont": F.cross_entropy(a @ b.T / 0.1, torch.arange(len(x), device=x.device)),
        "proto": ((z_E - prototypes[g]) ** 2).sum(1).mean(),
        "orth": (z_I.T @ z_E).pow(2).sum() / len(x) ** 2,
    }, z_E


WEIGHTS = {"cont": 0.05, "proto": 0.1, "orth": 0.1}


class Trainer:
    """One model + optimiser + step function for one configuration."""

    def __init__(self, make_model, batch, mode, log_dir: Path):
        torch.manual_seed(0)
        device = batch[0].device
        self.model = make_model().to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.batch = batch
        self.mode = mode
        self.prototypes = torch.zeros(self.model.groups, self.model.f_E.out_features,
                                      device=device)
        self.params = list(self.model.parameters())
        self.probe = None
        if mode == TORCHJD:
            self.torchjd = torchjd_modules()
            # TorchJD needs the last shared representation: the trunk's output, as the
            # forward makes it.
            self.model.trunk.register_forward_hook(
                lambda module, inputs, output: setattr(self, "features", output))
        if mode.startswith("probe"):
            kwargs = {"run_file": log_dir / f"{mode}.gprobe"}
            if mode != "probe defaults":
                kwargs["every"] = 1
            if mode.startswith("probe every step, whole trunk"):
                kwargs.update(shared=self.model.trunk, assemble=mode == WHOLE)
            self.probe = gradprobe.Probe(self.model, **kwargs)
            self.probe.watch_latent("z_I", self.model.f_I)
            self.probe.watch_latent("z_E")
        if mode == "probe defaults":  # the first probe step still runs (shared set, meta)
            self.step()
            self.probe.step = MAX_DEFAULT_INTERVAL ** 2

    def step(self):
        x, y, g = self.batch
        losses, z_E = losses_of(self.model, x, y, g, self.prototypes)
        if self.probe is not None:
            self.probe.observe(z_E=z_E, groups=g)
            self.probe.backward(losses, WEIGHTS)
        elif self.mode == "plain":
            sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
        elif self.mode == TORCHJD:
            autojac, aggregation = self.torchjd
            # The heads are shared by the losses here, not one per task: mtl_backward must
            # keep the graph between its per-task passes.
            autojac.mtl_backward([WEIGHTS.get(k, 1.0) * v for k, v in losses.items()],
                                 features=self.features, retain_graph=True)
            autojac.jac_to_grad(list(self.model.trunk.parameters()), aggregation.Sum())
        else:
            for value in losses.values():
                torch.autograd.grad(value, self.params, retain_graph=True, allow_unused=True)
            if self.mode == "naive":
                sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
        self.opt.step()
        self.opt.zero_grad()

    def counted_step(self, probe_step: bool):
        """The ops and syncs of the next step that is (or is not) a probe step."""
        if self.probe is None or self.probe.every == 1:
            if probe_step != (self.probe is not None):
                return None
        while self.probe is not None and self.probe.is_probe_step != probe_step:
            self.step()
        device_is_cpu = self.batch[0].device.type == "cpu"
        with count_ops(cpu_as_device=device_is_cpu) as counts:
            self.step()
        return counts


WHOLE = "probe every step, whole trunk"
TORCHJD = "torchjd"
REFERENCE = "forward + K backwards"
SEPARATE = "probe every step, whole trunk, separate"
FINDINGS_EVERY = 500  # Probe(findings_every=...)'s default
MODES = ["plain", "probe defaults", "probe every step", WHOLE, SEPARATE, "naive", REFERENCE]
PEERS = {"plain": "plain", REFERENCE: "F+K*B", WHOLE: "gradprobe whole trunk",
         TORCHJD: "TorchJD"}


def torchjd_modules():
    """``(torchjd.autojac, torchjd.aggregation)``, or None when torchjd is not importable."""
    try:
        from torchjd import aggregation, autojac
    except ImportError:
        return None
    return autojac, aggregation


def synchronised(device: torch.device):
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


def measure(label, make_model, batch, rounds, block, log_dir, counts_only=False, counts=True,
            clock="wall"):
    trainers = {mode: Trainer(make_model, batch, mode, log_dir / label) for mode in MODES}
    for trainer in trainers.values():  # warm-up: caches, allocator, first probe step
        for _ in range(3):
            trainer.step()
    print(f"\n{label}")
    if counts:
        print_counts(trainers)
    if not counts_only:
        plain = print_times(trainers, rounds, block, synchronised(batch[0].device), clock)
        print_findings_cost(trainers["probe every step"], plain)
    for trainer in trainers.values():
        if trainer.probe is not None:
            trainer.probe.close()


def print_counts(trainers):
    print("aten ops and host syncs per step (syncs: scalar reads + copies to the host + "
          "syncing ops)")
    print(f"{'configuration':40s} {'step':9s} {'ops':>6s} {'syncs':>6s} {'reads':>6s} "
          f"{'copies':>6s} {'sync ops':>8s}")
    probe_sites = None
    for mode, trainer in trainers.items():
        for probe_step in (True, False):
            counts = trainer.counted_step(probe_step)
            if counts is None:
                continue
            kind = "probe" if probe_step else "non-probe" if trainer.probe else "-"
            print(f"{mode:40s} {kind:9s} {counts.ops:6d} {counts.syncs:6d} "
                  f"{counts.scalar_reads:6d} {counts.host_copies:6d} {counts.sync_ops:8d}")
            if mode == WHOLE and probe_step:
                probe_sites = counts.sync_sites
    if probe_sites:
        top = ", ".join(f"{site} x{n}" for site, n in probe_sites.most_common(12))
        print(f"sync sites of a whole-trunk probe step (most frequent first): {top}")


CLOCKS = {
    # Wall time: what training waits for.
    "wall": time.perf_counter,
    # CPU time of every thread of the process (the training thread, torch's intra-op threads
    # and the run file's writer thread): the probe's whole cost on a CPU, whatever the load of
    # other processes on the machine.
    "process": time.process_time,
}


def interleaved_medians(trainers, rounds, block, synchronize, clock="wall"):
    """Seconds per step of each trainer: ``rounds`` rounds, each running every trainer for
    ``block`` steps in turn; the median over rounds."""
    now = CLOCKS[clock]
    times = {mode: [] for mode in trainers}
    for _ in range(rounds):
        for mode, trainer in trainers.items():
            synchronize()
            start = now()
            for _ in range(block):
                trainer.step()
            if trainer.probe is not None:
                # The block's steps written: the writer thread's work is counted in the
                # block that handed it over, not in the next configuration's.
                trainer.probe._writer.flush()
            synchronize()
            times[mode].append((now() - start) / block)
    return {mode: statistics.median(t) for mode, t in times.items()}


def print_times(trainers, rounds, block, synchronize, clock="wall"):
    medians = interleaved_medians(trainers, rounds, block, synchronize, clock)
    base = medians["plain"]
    print(f"median {clock} ms/step over {rounds} interleaved rounds of {block} steps")
    print(f"{'configuration':40s} {'ms/step':>9s} {'x plain':>8s}")
    for mode in MODES:
        print(f"{mode:40s} {medians[mode] * 1e3:9.2f} {medians[mode] / base:8.3f}")
    limit = medians[REFERENCE]
    for mode in (WHOLE, SEPARATE):
        print(f"{mode} / (forward + K backwards): {medians[mode] / limit:.3f} "
              "(target <= 1.1)")
    print(f"defaults overhead over plain: {100 * (medians['probe defaults'] / base - 1):+.1f}% "
          "(target <= 3%)")
    per_probe_step = medians["probe every step"] / base - 1
    for steps in (300, 1000, 100_000):
        share = sum(is_probe_step(s, None) for s in range(steps)) / steps
        print(f"  a {steps:,}-step run at the defaults: {100 * share:.1f}% probe steps, "
              f"about {100 * share * per_probe_step:+.1f}% over plain")
    return base


def print_findings_cost(trainer, plain_seconds, calls=5, every=FINDINGS_EVERY):
    """``probe.findings()`` on the run the every-step trainer has recorded (each call after a
    new probe step, so each one diagnoses), amortised over ``every`` plain training steps."""
    times = []
    for _ in range(calls):
        trainer.step()
        start = time.perf_counter()
        trainer.probe.findings()
        times.append(time.perf_counter() - start)
    cost = statistics.median(times)
    print(f"probe.findings() on a run of {trainer.probe.step} probe steps: {cost * 1e3:.1f} ms "
          f"(median of {calls}); called every {every} steps: "
          f"{100 * cost / (every * plain_seconds):+.2f}% over plain (target <= 3%)")


SHAPES = {
    # (conv: batch, length, width), (MLP: batch, input, width)
    "small": ((128, 100, 64), (256, 512, 1024)),
    "issue": ((512, 200, 128), (1024, 1024, 4096)),
}


def batches(shapes: str, device: torch.device):
    (conv_n, length, conv_width), (mlp_n, inp, mlp_width) = SHAPES[shapes]
    torch.manual_seed(0)
    conv_batch = (torch.randn(conv_n, 4, length), torch.randint(0, 2, (conv_n,)).float(),
                  torch.randint(0, 8, (conv_n,)))
    mlp_batch = (torch.randn(mlp_n, inp), torch.randint(0, 2, (mlp_n,)).float(),
                 torch.randint(0, 8, (mlp_n,)))
    return [
        (f"conv trunk (batch {conv_n}, length {length}, width {conv_width}), two latents, "
         "4 losses", functools.partial(ConvTwoLatent, length=length, width=conv_width),
         tuple(t.to(device) for t in conv_batch)),
        (f"MLP {inp}-{mlp_width}x3 (batch {mlp_n}), two latents, 4 losses",
         functools.partial(WideMLP, inp=inp, width=mlp_width),
         tuple(t.to(device) for t in mlp_batch)),
    ]


def peer_medians(make_model, batch, rounds, block, log_dir, clock="wall"):
    """Seconds per step of each peer column on one shape (TorchJD only where importable)."""
    modes = [m for m in PEERS if m != TORCHJD or torchjd_modules() is not None]
    trainers = {mode: Trainer(make_model, batch, mode, log_dir) for mode in modes}
    for trainer in trainers.values():  # warm-up: caches, allocator, first probe step
        for _ in range(3):
            trainer.step()
    medians = interleaved_medians(trainers, rounds, block, synchronised(batch[0].device), clock)
    for trainer in trainers.values():
        if trainer.probe is not None:
            trainer.probe.close()
    return medians


def in_backwards(medians, losses=4):
    """The whole-trunk step as F + x B: B and F read off plain = F + B and
    F+K*B = F + K B (the stretch goal is x <= (K + 1) / 2)."""
    backward = (medians[REFERENCE] - medians["plain"]) / (losses - 1)
    forward = medians["plain"] - backward
    return (medians[WHOLE] - forward) / backward


def print_peers(shapes, device, rounds, block, log_dir, clock="wall"):
    print(f"median {clock} time per step over {rounds} interleaved rounds of {block} steps, "
          "as a multiple of forward + K backwards (ms per step)")
    print("| shape | " + " | ".join(PEERS.values()) + " |")
    print("|---" * (len(PEERS) + 1) + "|")
    stretch = []
    for label, make_model, batch in batches(shapes, device):
        (log_dir / label).mkdir()
        medians = peer_medians(make_model, batch, rounds, block, log_dir / label, clock)
        limit = medians[REFERENCE]
        cells = [f"{medians[m] / limit:.2f}x ({medians[m] * 1e3:.1f} ms)"
                 if m in medians else "-" for m in PEERS]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        stretch.append(f"{label.split(' (')[0]}: whole trunk = F + {in_backwards(medians):.1f} B")
    print("; ".join(stretch) + " (F, B from plain = F + B and F+K*B = F + 4 B; stretch goal: "
          "F + 2.5 B)")
    if torchjd_modules() is None:
        print("TorchJD: not importable here (pip install torchjd), its column is left out")


def refuse(message):
    """Bad input: one line on stderr, exit status 2."""
    print(f"probe_overhead.py: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                        help="model and batch sizes (default: small on cpu, issue on cuda)")
    parser.add_argument("--counts-only", action="store_true",
                        help="print the op and sync counts, skip the timing")
    parser.add_argument("--no-counts", action="store_true",
                        help="skip the op and sync counts, time only")
    parser.add_argument("--model", choices=("both", "conv", "mlp"), default="both",
                        help="which of the two models to run (default: both)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the CPU time of the whole process (every thread)")
    parser.add_argument("--peers", action="store_true",
                        help="print the peer table (plain, forward + K backwards, whole trunk, "
                             "TorchJD) instead")
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        refuse(f"--device {args.device}: {exc}".splitlines()[0])
    if device.type == "cuda" and not torch.cuda.is_available():
        refuse(f"--device {args.device}: CUDA is not available to this torch "
               f"({torch.__version__})")
    shapes = args.shapes or ("issue" if device.type == "cuda" else "small")
    warnings.simplefilter("ignore")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, shapes {shapes!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.peers:
            print_peers(shapes, device, args.rounds, args.block, Path(tmp), args.clock)
            return
        for label, make_model, batch in batches(shapes, device):
            if args.model != "both" and not label.lower().startswith(args.model):
                continue
            (Path(tmp) / label).mkdir()
            measure(label, make_model, batch, args.rounds, args.block, Path(tmp),
                    args.counts_only, not args.no_counts, args.clock)


if __name__ == "__main__":
    main()
