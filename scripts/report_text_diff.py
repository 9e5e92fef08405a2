"""Compare the text of every PDF page the report draws, before and after a change.

    python scripts/report_text_diff.py --base main [RUN ...] [--demo-steps 200] [--pixels]
                                       [--keep DIR]

Renders, with the code of git ref ``--base`` and with the working tree, the failure report of
each run (``gradprobe.report.write_pdf`` of ``gradprobe.diagnose.diagnose(run)``) and, for two
or more runs, their comparison (``write_comparison_pdf``); then extracts every page's text with
pypdf and compares: the same number of pages and identical text on each. Without runs it
trains the demo's failing and fixed models (``--demo-steps`` steps each) and uses those.
Exits 0 when every document matches, 1 otherwise (printing the first differing lines).
``--pixels`` also renders every page as a PNG (60 dpi) with both codes and prints the share of
pixels that differ per page (a drawing change the text does not show).
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter with one side's gradprobe first on the path.
RENDER = """
import sys
from pathlib import Path
from gradprobe import load_run
from gradprobe.diagnose import diagnose
from gradprobe.report import write_comparison_pdf, write_pdf
out, PIXELS, paths = Path(sys.argv[1]), sys.argv[2] == "pixels", sys.argv[3:]
runs = [load_run(p) for p in paths]
findings = [diagnose(r) for r in runs]
for k, (run, found) in enumerate(zip(runs, findings)):
    write_pdf(run, found, out / f"report-{k}-{Path(paths[k]).stem}.pdf")
if len(runs) > 1:
    write_comparison_pdf(runs, findings, out / "compare.pdf")
if PIXELS:
    from gradprobe.report.compare import comparison_figures
    from gradprobe.report.plots import report_figures, save_figure
    documents = [(f"report-{k}-{Path(p).stem}", report_figures(r, f))
                 for k, (p, r, f) in enumerate(zip(paths, runs, findings))]
    if len(runs) > 1:
        documents.append(("compare", comparison_figures(runs, findings)))
    for stem, pages in documents:
        for number, (_, fig) in enumerate(pages, 1):
            save_figure(fig, out / f"{stem}.{number:02d}.png", dpi=60)
"""


def extract_base(ref: str, into: Path) -> Path:
    """The ``gradprobe`` package as it is at git ref ``ref``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "gradprobe"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def render(code_root: Path, runs: list[Path], out: Path, pixels: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", RENDER, str(out), "pixels" if pixels else "text",
                    *map(str, runs)], check=True, env=env, cwd=out)
    return sorted(out.glob("*.pdf"))


def page_texts(path: Path) -> list[str]:
    from pypdf import PdfReader

    return [page.extract_text() for page in PdfReader(path).pages]


def compare(before: Path, after: Path) -> list[str]:
    """Differences between two PDFs' page texts, as printable lines (none when identical)."""
    old, new = page_texts(before), page_texts(after)
    problems = []
    if len(old) != len(new):
        problems.append(f"  {len(old)} pages before, {len(new)} after")
    for number, (a, b) in enumerate(zip(old, new), 1):
        if a != b:
            diff = difflib.unified_diff(a.splitlines(), b.splitlines(), "before", "after",
                                        lineterm="", n=0)
            problems.append(f"  page {number} differs:")
            problems.extend(f"    {line}" for line in list(diff)[:12])
    return problems


def pixel_changes(before: Path, after: Path, stem: str) -> list[str]:
    """Per page of document ``stem`` rendered at 60 dpi: the share of pixels that differ."""
    from matplotlib.image import imread

    out = []
    for old in sorted(before.glob(f"{stem}.*.png")):
        a, b = imread(old), imread(after / old.name)
        if a.shape != b.shape:
            out.append(f"  {old.name}: size {a.shape} before, {b.shape} after")
        elif (changed := float((abs(a - b).max(axis=2) > 0.02).mean())) > 0:
            out.append(f"  {old.name}: {changed:.3%} of the pixels differ")
    return out


def demo_runs(steps: int, into: Path) -> list[Path]:
    from gradprobe.demo import train

    return [Path(train(variant, steps=steps, out_dir=into, progress=False)["run_path"])
            for variant in ("failing", "fixed")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run files (.gprobe or .ckpt)")
    parser.add_argument("--base", required=True, help="git ref of the code before the change")
    parser.add_argument("--demo-steps", type=int, default=200)
    parser.add_argument("--pixels", action="store_true",
                        help="also render every page as a PNG and report the pixels that differ")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the PDFs here (before/ and after/) instead of a temp folder")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="gradprobe-report-text-"))
    runs = [p.resolve() for p in args.runs] or demo_runs(args.demo_steps, work / "runs")
    before = render(extract_base(args.base, work / "base"), runs, work / "before", args.pixels)
    after = render(ROOT, runs, work / "after", args.pixels)
    if [p.name for p in before] != [p.name for p in after]:
        print(f"different documents: {[p.name for p in before]} vs {[p.name for p in after]}")
        return 1
    failed = False
    for old, new in zip(before, after):
        problems = compare(old, new)
        pages = len(page_texts(new))
        print(f"{new.name}: {pages} pages, " + ("text identical" if not problems else "DIFFERS"))
        for line in problems:
            print(line)
        failed = failed or bool(problems)
        if args.pixels:  # drawing may differ where the text does not: said, not failed on
            for line in pixel_changes(work / "before", work / "after", new.stem) or [
                    "  every page's pixels identical"]:
                print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
