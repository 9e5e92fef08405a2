"""Train the record-22 contrastive decoupling model, failing or fixed, with gradprobe attached.

    python examples/decoupling/train.py --variant failing --out runs/
    python examples/decoupling/train.py --variant fixed --steps 2000 --seed 1 --out runs/
    gradprobe analyze runs/failing.gprobe

Writes ``<out>/<variant>.gprobe`` (the run file) and ``<out>/<variant>.ckpt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradprobe.demo.decoupling import DEFAULT_STEPS, REMEDIES, train


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["failing", "fixed", "both"], default="both")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("gradprobe-demo"))
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--disable", default="", help=f"comma-separated remedies to switch off in 'fixed': {','.join(REMEDIES)}")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON (without the history)")
    args = ap.parse_args(argv)
    disable = frozenset(x.strip() for x in args.disable.split(",") if x.strip())
    variants = ["failing", "fixed"] if args.variant == "both" else [args.variant]
    results = {}
    for v in variants:
        r = train(v, steps=args.steps, seed=args.seed, out_dir=args.out, probe_every=args.probe_every,
                  progress=not args.quiet, disable=disable if v == "fixed" else frozenset())
        results[v] = {k: val for k, val in r.items() if k != "history"}
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"\n{'variant':8s} {'held-out':>9s} {'val':>7s} {'train':>7s} {'Bayes':>7s} {'seconds':>8s}")
        for v, r in results.items():
            print(f"{v:8s} {r['heldout_accuracy']:9.3f} {r['val_accuracy']:7.3f} {r['train_accuracy']:7.3f} "
                  f"{r['bayes_accuracy']:7.3f} {r['train_seconds']:8.1f}")
        for v, r in results.items():
            print(f"{v}: run {r['run_path']}  checkpoint {r['ckpt_path']}")
    return results


if __name__ == "__main__":
    main()
