"""Ablation of the record-point-24 remedies: switch one off at a time, train on several seeds, compare.

    python examples/decoupling/ablation.py --seeds 0,1,2 --out runs/ablation --markdown

Record-22 point 8 ("strict implementation discipline: every designed component verified in
code, with ablations"). For every configuration ("failing", "fixed", and "fixed - <remedy>"
for every remedy) and seed it trains on that seed's data, and prints held-out / validation
accuracy as mean +- standard deviation over the seeds, the gain over "failing" (the mean and
standard deviation of the per-seed difference), and, with ``--findings``, gradprobe's finding
ids for each run of the first seed (the probe is attached only then: it costs time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gradprobe.demo.data import make_data
from gradprobe.demo.decoupling import DEFAULT_STEPS, REMEDIES, train


def finding_ids(run_path: str | None) -> str:
    """Finding ids of gradprobe's diagnosis of ``run_path`` (``id xN`` when repeated)."""
    if run_path is None:
        return "(no run file)"
    from gradprobe import load_run
    from gradprobe.diagnose import diagnose

    ids = [f.id for f in diagnose(load_run(run_path))]
    if not ids:
        return "(no findings)"
    counts = {i: ids.count(i) for i in sorted(set(ids))}
    return ", ".join(i if n == 1 else f"{i} x{n}" for i, n in counts.items())


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample standard deviation, ddof 1) of ``values``."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.3f} ± {std:.3f}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data and training)")
    ap.add_argument("--out", type=Path, default=Path("gradprobe-ablation"))
    ap.add_argument("--only", default="", help="comma-separated subset of remedies to ablate")
    ap.add_argument("--findings", action="store_true", help="attach the probe on the first seed and list findings")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    remedies = [r.strip() for r in args.only.split(",") if r.strip()] or list(REMEDIES)
    configs = [("failing", "failing", frozenset()), ("fixed", "fixed", frozenset())]
    configs += [(f"fixed - {r}", "fixed", frozenset({r})) for r in remedies]
    rows = {label: {"label": label, "heldout": [], "val": [], "train": [], "findings": ""} for label, _, _ in configs}
    bayes = []
    for seed in seeds:
        data = make_data(seed)
        bayes.append(data.heldout.bayes_accuracy)
        for label, variant, disable in configs:
            probe = args.findings and seed == seeds[0]
            out = args.out / f"seed{seed}" / label.replace(" - ", "-no-")
            r = train(variant, steps=args.steps, seed=seed, out_dir=out, progress=False, disable=disable, data=data,
                      use_probe=probe)
            row = rows[label]
            row["heldout"].append(r["heldout_accuracy"])
            row["val"].append(r["val_accuracy"])
            row["train"].append(r["train_accuracy"])
            if probe:
                row["findings"] = finding_ids(r["run_path"])
            print(f"seed {seed} {label:24s} held-out {r['heldout_accuracy']:.3f}  val {r['val_accuracy']:.3f}  "
                  f"train {r['train_accuracy']:.3f}  ({r['train_seconds']:.0f}s)", flush=True)
    failing = np.asarray(rows["failing"]["heldout"])
    for row in rows.values():
        row["gain"] = mean_std((np.asarray(row["heldout"]) - failing).tolist())
    print(f"\nseeds {seeds}; best achievable held-out accuracy {mean_std(bayes)}\n")
    print(f"{'configuration':24s} {'held-out':>15s} {'gain vs failing':>16s} {'val':>15s} {'train':>15s}")
    for row in rows.values():
        print(f"{row['label']:24s} {mean_std(row['heldout']):>15s} {row['gain']:>16s} {mean_std(row['val']):>15s} "
              f"{mean_std(row['train']):>15s}  {row['findings']}")
    if args.markdown:
        print("\n| configuration | held-out acc | gain vs failing | val acc | train acc |"
              + (f" findings (seed {seeds[0]}) |" if args.findings else ""))
        print("|---|---|---|---|---|" + ("---|" if args.findings else ""))
        for row in rows.values():
            print(f"| {row['label']} | {mean_std(row['heldout'])} | {row['gain']} | {mean_std(row['val'])} | "
                  f"{mean_std(row['train'])} |" + (f" {row['findings']} |" if args.findings else ""))
    return list(rows.values())


if __name__ == "__main__":
    main()
