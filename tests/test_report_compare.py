"""The comparison PDF: two real runs (tests/models.py with a real Probe), read back with pypdf."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pypdf = pytest.importorskip("pypdf")

import models  # noqa: E402
from gradprobe import Probe, __version__, load_run  # noqa: E402
from gradprobe.diagnose import Finding, diagnose  # noqa: E402
from gradprobe.record import RunWriter  # noqa: E402
from gradprobe.report import write_comparison_pdf  # noqa: E402
from gradprobe.report.compare import COMPARE_TITLES, comparison_figures, run_labels  # noqa: E402
from gradprobe.report.data import MAX_POINTS  # noqa: E402
from gradprobe.report.plots import save_figure  # noqa: E402

AFTER_WEIGHTS = {"cont": 1.0, "proto": 0.5, "orth": 1.0}


@pytest.fixture(scope="module")
def run_paths(tmp_path_factory):
    """'before' with the models' weights, 'after' with larger auxiliary weights."""
    folder = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = {}
    try:
        for name, weights in (("before", None), ("after", AFTER_WEIGHTS)):
            path = folder / f"{name}.gprobe"

            def factory(model, path=path, name=name):
                probe = Probe(model, shared=model.trunk, every=2, run_file=path, name=name,
                              expect_groups_per_batch=1)
                probe.watch_latent("z_E")
                return probe
            with pytest.MonkeyPatch.context() as mp:
                if weights is not None:
                    mp.setattr(models, "WEIGHTS", weights)
                models.train(30, factory)
            paths[name] = path
    finally:
        torch.set_num_threads(threads)
    return paths


@pytest.fixture(scope="module")
def runs(run_paths):
    opened = [load_run(run_paths["before"]), load_run(run_paths["after"])]
    yield opened
    for r in opened:
        r.close()


@pytest.fixture(scope="module")
def findings(runs):
    found = [diagnose(r) for r in runs]
    # one id only the first run has: its cell in the second run's column is '-'
    found[0] = found[0] + [Finding(
        id="overfitting", severity="info", title="validation loss rose", subject="val_loss",
        key_number="val x1.2", evidence={}, why="why", remedy="remedy", steps=(10, 28),
        plot={"quantity": "logged", "names": ["val_loss"], "threshold": None,
              "ratio_to": None})]
    return found


@pytest.fixture(scope="module")
def pdf(runs, findings, tmp_path_factory):
    path = tmp_path_factory.mktemp("compare-pdf") / "out" / "compare.pdf"
    written = write_comparison_pdf(runs, findings, path)
    assert written == path
    reader = pypdf.PdfReader(str(path))
    return path, [p.extract_text() for p in reader.pages], reader.metadata


def test_pdf_pages_names_and_metadata(pdf, runs):
    path, texts, meta = pdf
    # overview, then the overlays of what was recorded (no saturation watch, no prototypes
    # page), the sections filling the pages in turn: 3 aux ratios (2 rows), 4 losses (2 rows),
    # z_E (1 row), the batches (1 row): 6 rows on two pages
    assert len(texts) == 3
    assert not path.with_name(path.name + ".partial").exists()
    overlays = "\n".join(texts[1:])
    for key in ("gradients", "losses", "representations", "batches"):
        assert COMPARE_TITLES[key] in overlays, key
    assert COMPARE_TITLES["saturation"] not in "\n".join(texts)
    for name in ("before", "after"):
        assert name in texts[0]
        for text in texts[1:]:  # the run legend is on every overlay page
            assert name in text
    assert "page 1 of 3" in texts[0] and "page 3 of 3" in texts[-1]
    assert meta.title == "gradprobe comparison: before vs after"
    assert meta.subject == "before, after"
    assert meta.creator == f"gradprobe {__version__}"
    assert meta.creation_date is not None


def test_overlay_pages_are_filled(runs, findings):
    """No page half empty: on every overlay page the panels reach from under the header to
    the footer."""
    figures = comparison_figures(runs, findings)
    for name, fig in figures[1:]:
        boxes = [ax.get_position() for ax in fig.axes if ax.axison]
        assert min(b.y0 for b in boxes) < 0.12, name
        assert max(b.y1 for b in boxes) > 0.6, name
        fig.clear()


def test_every_finding_id_is_on_page_one(pdf, findings):
    _, texts, _ = pdf
    ids = {f.id for fs in findings for f in fs}
    assert "overfitting" in ids and len(ids) >= 3
    first = texts[0]
    for fid in ids:
        assert fid in first, fid
    for f in findings[0] + findings[1]:
        assert f.severity.upper() in first
    # 'overfitting' is in the first run only: the second run's cell is '-', and it was cleared
    after_row = first.split("overfitting INFO", 1)[1].split("The runs", 1)[0]
    assert "-" in after_row.split()
    assert "cleared" in first and "overfitting" in first.split("cleared", 1)[1]


def test_page_renders_to_a_non_blank_png(runs, findings):
    figures = dict(comparison_figures(runs, findings))
    import matplotlib.image as mpimg
    for name in ("overview", "gradients"):
        buf = io.BytesIO()
        save_figure(figures[name], buf, format="png", dpi=60)
        buf.seek(0)
        pixels = mpimg.imread(buf)[..., :3]
        assert pixels.shape[0] > 600 and pixels.shape[1] > 400
        assert pixels.std() > 0.05, name
        assert (pixels.mean(axis=2) < 0.5).mean() > 0.005, name
    # one colour per run, the same on every page; line styles differ too (grayscale)
    colours = {}
    for name, fig in figures.items():
        if name == "overview":
            continue
        legend = fig.legends[0]
        for text, handle in zip(legend.get_texts(), legend.legend_handles):
            colours.setdefault(text.get_text(), set()).add(
                (handle.get_color(), str(handle.get_linestyle())))
    assert set(colours) == {"before", "after"}
    assert all(len(v) == 1 for v in colours.values())
    assert colours["before"] != colours["after"]
    (c1, s1), (c2, s2) = colours["before"].pop(), colours["after"].pop()
    assert c1 != c2 and s1 != s2
    # every gradient panel overlays both runs and draws the swamping threshold
    grad = figures["gradients"]
    panels = [ax for ax in grad.axes if "largest" in ax.get_ylabel()]
    assert len(panels) >= 3  # cont, proto, orth (the losses section follows on the page)
    for ax in panels:
        assert ax.get_yscale() == "log"
        assert len([ln for ln in ax.get_lines() if len(ln.get_xdata()) > 2]) >= 2
        assert any("swamping threshold" in t.get_text() for t in ax.texts)
    for fig in figures.values():
        fig.clear()


def synthetic_run(path, name: str, losses: list[str], steps: int, latent: bool):
    rng = np.random.default_rng(len(losses))
    writer = RunWriter(path)
    writer.set_meta(run_name=name, losses=losses, task=losses[0], every=1,
                    roles={n: "task" if i == 0 else "other" for i, n in enumerate(losses)})
    for step in range(steps):
        scalars = {}
        for k, loss in enumerate(losses):
            scalars[("loss", loss)] = float(np.exp(-step / steps) * (k + 1) + rng.random())
            scalars[("weighted_grad_norm", loss)] = float(rng.random() + 0.01) / (k + 1)
        if latent:  # and a logged validation accuracy
            scalars[("logged", "val_acc")] = step / steps
            scalars[("effective_rank", "z")] = 4.0 + rng.random()
            scalars[("effective_rank_isotropic", "z")] = 7.5
        writer.write_step(step, scalars, {})
    writer.close()


def test_different_losses_and_latents_overlay_what_is_shared(tmp_path):
    synthetic_run(tmp_path / "a.gprobe", "same", ["task", "cont"], 40, latent=True)
    # a long run with another loss and no latent: decimated, and its extra loss drawn alone
    synthetic_run(tmp_path / "b.gprobe", "same", ["task", "cont", "extra"], MAX_POINTS + 500,
                  latent=False)
    with load_run(tmp_path / "a.gprobe") as a, load_run(tmp_path / "b.gprobe") as b:
        assert run_labels([a, b]) == ["same (a.gprobe)", "same (b.gprobe)"]
        figures = dict(comparison_figures([a, b], [[], []]))
    # gradients (1 row), losses and the logged metric (2 rows) and the latent (1 row) fill one
    # page, named after its first section; each later section has its heading on it
    assert list(figures) == ["overview", "gradients"]
    page = figures["gradients"]
    titles = [ax.get_title(loc="left") for ax in page.axes]
    assert "cont" in titles
    assert "extra (not in same (a.gprobe))" in titles
    assert titles.count("task") == 1  # the task's loss; its own ratio is not an auxiliary's
    assert "z: effective rank (not in same (b.gprobe))" in titles
    texts = [t.get_text() for ax in page.axes for t in ax.texts]
    assert "Losses, run by run" in texts and "Representations, run by run" in texts
    # the logged metric as logged, from the run that logged it
    logged = next(ax for ax in page.axes if ax.get_title(loc="left").startswith("val_acc"))
    assert logged.get_title(loc="left") == "val_acc (not in same (b.gprobe))"
    assert logged.get_ylabel() == "logged value"
    x, y = logged.get_lines()[0].get_data()
    np.testing.assert_allclose(y, np.arange(40) / 40)
    overview = " ".join(t.get_text() for t in figures["overview"].texts)
    assert "Findings: none in any run" in overview
    for fig in figures.values():
        for ax in fig.axes:
            for line in ax.get_lines():
                assert len(line.get_xdata()) <= MAX_POINTS
        fig.clear()


def test_mismatched_inputs_are_refused(runs, tmp_path):
    with pytest.raises(ValueError):
        write_comparison_pdf(runs, [[]], tmp_path / "x.pdf")
    with pytest.raises(ValueError):
        write_comparison_pdf([], [], tmp_path / "x.pdf")
    assert not (tmp_path / "x.pdf").exists()


def gradprobe_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradprobe.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_compare_prints_the_key_numbers_analyze_prints(run_paths, pdf):
    """One source of numbers: every finding's key number in analyze's JSON is in compare's
    output, on its run's line with its id and subject, and on the PDF's first page."""
    docs = {}
    for name in ("before", "after"):
        done = gradprobe_cli("analyze", run_paths[name], "--json", "-")
        docs[name], _ = json.JSONDecoder().raw_decode(done.stdout)
    done = gradprobe_cli("compare", run_paths["before"], run_paths["after"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    found = [(name, f) for name, doc in docs.items() for f in doc["findings"]]
    assert found  # the runs have findings to compare
    for name, f in found:
        line = [ln for ln in lines if ln.split()[:1] == [name] and f" {f['id']} " in ln
                and f" {f['subject']} " in ln and ln.endswith(f"[{f['key_number']}]")]
        assert len(line) == 1, (name, f["id"], f["subject"])
    _, texts, _ = pdf
    first = " ".join(texts[0].split())
    for name, f in found:
        assert f"{f['subject']}: {f['key_number']}" in first, f["key_number"]
    before = {f["id"] for f in docs["before"]["findings"]}
    after = {f["id"] for f in docs["after"]["findings"]}
    change = lines[-1]
    assert change.startswith("after against before:")
    for fid in before - after:
        assert fid in change.split("cleared", 1)[1].split(";")[0]
