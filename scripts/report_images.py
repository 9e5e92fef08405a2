"""Regenerate docs/images/report-*.png: every page of the report of the demo's failing run.

    python scripts/report_images.py [--steps N] [--dpi 110] [--run PATH]

Trains ``gradprobe.demo.train("failing")`` (the record-22 reproduction, at the demo's own
length ``gradprobe.demo.DEFAULT_STEPS`` unless ``--steps`` says otherwise) unless ``--run`` names
an existing run file, diagnoses it with ``gradprobe.diagnose.diagnose`` and saves each page of
``gradprobe.report.report_figures`` (the same figures the PDF holds) as a PNG.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gradprobe import load_run
from gradprobe.demo import DEFAULT_STEPS, train
from gradprobe.diagnose import diagnose
from gradprobe.report import report_figures, save_figure

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="an existing run file")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="training steps (default: the demo's, %(default)s)")
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    if args.run is None:
        work = Path(tempfile.mkdtemp(prefix="gradprobe-report-images-"))
        result = train("failing", steps=args.steps, out_dir=work, progress=False)
        run_path = Path(result["run_path"])
    else:
        run_path = args.run

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("report-*.png"):
        old.unlink()
    with load_run(run_path) as run:
        findings = diagnose(run)
        for name, fig in report_figures(run, findings, title="gradprobe report: record-22 demo"):
            path = args.out / f"report-{name}.png"
            save_figure(fig, path, dpi=args.dpi)
            print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    main()
