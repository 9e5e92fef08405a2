"""Ablation of the record-point-24 remedies: switch one off at a time, train, compare.

    python examples/decoupling/ablation.py --steps 1000 --out runs/ablation --markdown

Record-22 point 8 ("strict implementation discipline: every designed component verified in
code, with ablations"). Prints a table of held-out / validation accuracy per configuration ("failing", "fixed", and
"fixed - <remedy>" for every remedy) and, when ``gradprobe.diagnose`` can analyse a run, the
finding ids it reports for each run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradprobe.demo.data import make_data
from gradprobe.demo.decoupling import DEFAULT_STEPS, REMEDIES, train


def finding_ids(run_path: str | None) -> str:
    """Finding ids of gradprobe's diagnosis of ``run_path``, or a note saying why there are none."""
    if run_path is None:
        return "(no run file: gradprobe.Probe unavailable)"
    try:
        import gradprobe.diagnose as dx
    except ImportError as exc:  # pragma: no cover - depends on the installation
        return f"(gradprobe.diagnose not importable: {exc})"
    fn = next((getattr(dx, n) for n in ("diagnose", "analyze", "analyse") if callable(getattr(dx, n, None))), None)
    if fn is None:
        return "(gradprobe.diagnose has no diagnose()/analyze() yet)"
    try:
        try:
            from gradprobe import load_run
        except ImportError:
            findings = fn(run_path)
        else:
            findings = fn(load_run(run_path))
    except Exception as exc:  # report, never hide, but keep the table
        return f"(diagnosis failed: {type(exc).__name__}: {exc})"
    findings = getattr(findings, "findings", findings)
    ids = []
    for f in findings or []:
        fid = f.get("id") if isinstance(f, dict) else getattr(f, "id", None)
        ids.append(str(fid if fid is not None else f))
    if not ids:
        return "(no findings)"
    counts = {i: ids.count(i) for i in sorted(set(ids))}  # one entry per id, x n when repeated
    return ", ".join(i if n == 1 else f"{i} x{n}" for i, n in counts.items())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("gradprobe-ablation"))
    ap.add_argument("--only", default="", help="comma-separated subset of remedies to ablate")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = ap.parse_args(argv)
    data = make_data(args.seed)
    remedies = [r.strip() for r in args.only.split(",") if r.strip()] or list(REMEDIES)
    configs = [("failing", "failing", frozenset()), ("fixed", "fixed", frozenset())]
    configs += [(f"fixed - {r}", "fixed", frozenset({r})) for r in remedies]
    rows = []
    for label, variant, disable in configs:
        out = args.out / label.replace(" - ", "-no-")
        r = train(variant, steps=args.steps, seed=args.seed, out_dir=out, progress=False, disable=disable, data=data)
        r["label"] = label
        r["findings"] = finding_ids(r["run_path"])
        rows.append(r)
        print(f"{label:24s} held-out {r['heldout_accuracy']:.3f}  val {r['val_accuracy']:.3f}  "
              f"({r['train_seconds']:.0f}s)", flush=True)
    print(f"\nBayes-optimal accuracy: held-out {data.heldout.bayes_accuracy:.3f}, val {data.val.bayes_accuracy:.3f}\n")
    print(f"{'configuration':24s} {'held-out':>8s} {'val':>6s} {'train':>6s}  findings")
    for r in rows:
        print(f"{r['label']:24s} {r['heldout_accuracy']:8.3f} {r['val_accuracy']:6.3f} {r['train_accuracy']:6.3f}  "
              f"{r['findings']}")
    if args.markdown:
        print("\n| configuration | held-out acc | val acc | train acc | findings |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['label']} | {r['heldout_accuracy']:.3f} | {r['val_accuracy']:.3f} | "
                  f"{r['train_accuracy']:.3f} | {r['findings']} |")
    return rows


if __name__ == "__main__":
    main()
