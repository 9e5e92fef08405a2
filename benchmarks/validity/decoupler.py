"""The record-22 decoupler (docs/record-22.md), trained through ``gradprobe.demo``'s public
``train(...)``: the founding story's dual-stream model and the record's fix.

Source: the project's own reproduction of record 22 (docs/demo.md); the failing variant is
the record's design, the fixed variant its remedies (memory-bank negatives, gradient-norm
balancing, curriculum, decorrelation, L1, learnable temperature). It is in the corpus as
the one model the thresholds were first set on; it is not a public training loop.

Variants (truth by construction, docs/demo.md):
- ``failing``: fixed weights 0.05-0.1 on the contrastive, prototype and adversarial losses
  (their weighted gradients are a few percent of the task's) and single-cell-line batches
  (every contrastive negative shares the anchor's cell line). Expected:
  ``gradient-swamping``, ``static-loss-weights`` and ``weak-contrastive-signal`` on ``cont``.
  Allowed (true, and left by both variants, docs/demo.md): ``constraint-neglect``,
  ``overfitting``, ``sigmoid-saturation``, ``representation-collapse``,
  ``prototype-collapse``; and swamping / static weights of ``proto`` and ``adv``. Judged on
  the layers each loss shares with the task (rule change 8, benchmarks/validity/
  rule-changes.md), ``proto`` holds 34-59 % of the task's gradient on the environment
  stream it acts on (it was "swamped" only against the task's gradient on the invariant
  stream, which it never reaches), and ``adv`` sits at 4-6 % with a spread that straddles
  the threshold on some seeds (``info``). Both were expected by construction before the
  per-layer measure; neither has a measured truth that they are held back.
- ``fixed``: not healthy (it still memorises its training cell lines), but the three
  mechanisms its remedies address are gone by construction: balanced weights (no swamping,
  no static weights) and memory-bank negatives from other cell lines. Must not:
  ``gradient-swamping``, ``weak-contrastive-signal``, ``static-loss-weights``; the
  remaining failures are allowed as above.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from gradprobe import demo

from .harness import Expect, Family, Variant

STEPS = 1000
_AUX = ("cont", "proto", "adv")
_LEFT_BY_BOTH = tuple(Expect(fid, subject) for fid, subject in (
    ("constraint-neglect", "cont"), ("constraint-neglect", "proto"), ("constraint-neglect", "orth"),
    ("overfitting", "val_task"), ("sigmoid-saturation", "energy"),
    ("representation-collapse", "z_E"), ("representation-collapse", "z_I"),
    ("prototype-collapse", "cell")))


def train(variant: str, seed: int, log: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = demo.train(variant, steps=STEPS, seed=seed, out_dir=tmp, progress=False)
        shutil.move(result["run_path"], log)
    return {"heldout_acc": result["heldout_accuracy"], "bayes_acc": result["bayes_accuracy"],
            "train_acc": result["train_accuracy"]}


FAMILY = Family(
    name="decoupler",
    source="record 22 (docs/record-22.md) via gradprobe.demo.train; the project's own model",
    train=train,
    variants=(
        Variant("failing", False,
                "fixed small weights swamp cont/proto/adv; single-cell-line batches give "
                "same-line negatives",
                expected=(Expect("gradient-swamping", "cont"),
                          Expect("weak-contrastive-signal", "cont"),
                          Expect("static-loss-weights", "cont")),
                allowed=_LEFT_BY_BOTH + tuple(
                    Expect(fid, a) for fid in ("gradient-swamping", "static-loss-weights")
                    for a in ("proto", "adv"))),
        Variant("fixed", False,
                "balanced weights and memory-bank negatives remove swamping, static weights and "
                "same-line negatives; memorisation remains",
                allowed=_LEFT_BY_BOTH,
                must_not=("gradient-swamping", "weak-contrastive-signal", "static-loss-weights")),
    ),
    seeds=(0, 1),
    quick=(("failing", 1),),
)
