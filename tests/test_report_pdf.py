"""The PDF report: real runs from tests/models.py with a real Probe, read back with pypdf."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pypdf = pytest.importorskip("pypdf")

from gradprobe import Probe, __version__, load_run  # noqa: E402
from gradprobe.record import RunWriter  # noqa: E402
from gradprobe.report.data import MAX_POINTS, decimate  # noqa: E402
from gradprobe.report.pdf import write_pdf  # noqa: E402
from gradprobe.report.plots import report_figures, save_figure  # noqa: E402

from models import train  # noqa: E402


from gradprobe.diagnose import FINDING_IDS, Finding, diagnose  # noqa: E402


PLOTS = {
    "gradient-swamping": {"quantity": "weighted_grad_norm", "names": ["cont", "task"],
                          "threshold": 0.1, "ratio_to": "task"},
    "gradient-conflict": {"quantity": "grad_cosine", "names": ["proto|orth"], "threshold": 0.0,
                          "ratio_to": None},
    "representation-collapse": {"quantity": "effective_rank", "names": ["z_E"],
                                "threshold": 1.5, "ratio_to": None},
    "prototype-stale": {"quantity": "prototype_drift", "names": ["proto"], "threshold": 1e-6,
                        "ratio_to": None},
    "prototype-collapse": {"quantity": "prototype_mean_distance", "names": ["proto"],
                           "threshold": None, "ratio_to": None},
    "constraint-neglect": {"quantity": "loss", "names": ["cont"], "threshold": None,
                           "ratio_to": None},
    "static-loss-weights": {"quantity": "weight", "names": ["cont", "proto"], "threshold": None,
                            "ratio_to": None},
    "batch-composition-mismatch": {"quantity": "groups_per_batch", "names": ["batch"],
                                   "threshold": 1.0, "ratio_to": None},
    # a quantity no page draws: it goes to the 'Further evidence' page
    "orthogonality-vanishing": {"quantity": "latent_norm", "names": ["z_E"], "threshold": None,
                                "ratio_to": None},
}


def all_findings(last_step: int) -> list:
    """One finding of every id (severities mixed), as the diagnosis would report them."""
    severities = ("error", "warning", "info")
    out = []
    for k, fid in enumerate(FINDING_IDS):
        out.append(Finding(
            id=fid, severity=severities[k % 3], title=f"{fid} seen in the test run",
            subject="cont", key_number=f"ratio 0.0{k + 1}", evidence={"median": 0.01 * k},
            why="record-22, a numbered point: a sentence of why this matters for the model.",
            remedy="Do the remedy the record recommends (next step 1): a long sentence that runs "
                   "over the width of one line in the verdict table, so it must be cut there.",
            steps=(4, last_step) if fid in PLOTS else None, plot=PLOTS.get(fid)))
    return out


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "four.gprobe"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def factory(model):
            probe = Probe(model, shared=model.trunk, every=2, run_file=path, expect_groups_per_batch=1)
            probe.watch_latent("z_E")
            probe.watch_prototypes("proto", lambda: model.prototypes, latent="z_E")
            return probe
        train(40, factory)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def run(run_path):
    r = load_run(run_path)
    yield r
    r.close()


@pytest.fixture(scope="module")
def figures(run):
    """The pages of the all-findings report, built once for the tests that read them."""
    pages = report_figures(run, all_findings(38))
    yield pages
    close_all(pages)


def pdf_text(path) -> tuple[int, list[str], dict]:
    reader = pypdf.PdfReader(str(path))
    return len(reader.pages), [p.extract_text() for p in reader.pages], reader.metadata


def close_all(figures):
    for _, fig in figures:
        fig.clear()


def test_pdf_pages_verdict_and_every_finding_id(run, figures, tmp_path):
    findings = all_findings(38)
    out = write_pdf(run, findings, tmp_path / "report.pdf", title="Four-loss test run")
    names = [n for n, _ in figures]
    n_pages, texts, meta = pdf_text(out)
    assert n_pages == len(names)
    assert names[0] == "verdict" and "findings" in names
    for expected in ("gradients", "losses", "representations", "prototypes", "batches",
                     "evidence"):
        assert expected in names
    assert "saturation" not in names  # nothing recorded: the page is left out
    assert "Four-loss test run" in texts[0]
    assert "failure modes found" in texts[0]
    assert "ERROR" in texts[0] and "WARNING" in texts[0]
    # too many to show with their notes: page 1 holds every error and warning title and
    # names the notes it leaves to the detail pages
    flat = " ".join(texts[0].split())
    for f in findings:
        if f.severity != "info":
            assert f.title in flat, f.title
    notes = [f for f in findings if f.severity == "info"]
    assert f"{len(notes)} more findings ({len(notes)} notes:" in flat
    assert all(f.id in flat for f in notes)
    everything = "\n".join(texts)
    for fid in FINDING_IDS:
        assert fid in texts[0] or fid in everything.split("Findings in detail", 1)[0], fid
        assert fid in everything
    # errors come first in the verdict table
    first = texts[0]
    assert first.index("gradient-swamping") < first.index("constraint-neglect")
    # every plotted finding says on its page what to look at
    grad_page = texts[names.index("gradients")]
    assert "gradient-swamping: look at cont relative to task" in grad_page
    assert "gradient-conflict" in grad_page
    assert "orthogonality-vanishing" in texts[names.index("evidence")]
    assert meta.title == "Four-loss test run"
    assert meta.subject == run.name
    assert meta.creator == f"gradprobe {__version__}"
    assert meta.creation_date is not None


def test_real_diagnosis_report(run, tmp_path):
    findings = diagnose(run)
    out = write_pdf(run, findings, tmp_path / "diagnosed.pdf")
    _, texts, meta = pdf_text(out)
    assert meta.title == f"gradprobe report: {run.name}"
    for f in findings:
        assert f.id in "\n".join(texts)
    if not findings:
        assert "No failure modes found." in texts[0]




def test_page_renders_to_a_non_blank_png(figures):
    pages = dict(figures)
    for name in ("verdict", "gradients"):
        buf = io.BytesIO()
        save_figure(pages[name], buf, format="png", dpi=60)
        buf.seek(0)
        import matplotlib.image as mpimg
        pixels = mpimg.imread(buf)[..., :3]
        assert pixels.shape[0] > 600 and pixels.shape[1] > 400
        assert pixels.std() > 0.05, name  # not a blank page
        assert (pixels.mean(axis=2) < 0.5).mean() > 0.005, name  # ink on the page


def test_pages_of_unrecorded_quantities_are_left_out(tmp_path):
    path = tmp_path / "bare.gprobe"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def factory(model):
            probe = Probe(model, shared=model.trunk, every=2, run_file=path)
            probe.watch_latent("z_E")
            return probe
        train(6, factory)
    finally:
        torch.set_num_threads(threads)
    with load_run(path) as bare:
        figures = report_figures(bare, [])
        names = [n for n, _ in figures]
        verdict = " ".join(t.get_text() for t in figures[0][1].texts)
        close_all(figures)
    # no prototypes, no saturation watch: those pages are left out, not drawn empty
    assert names == ["verdict", "gradients", "losses", "representations", "batches"]
    assert "No failure modes found." in verdict


def synthetic_run(path, losses: list[str], steps: int, every: int = 1):
    """A run written with RunWriter directly: loss/weight/norms/cosines and Gram matrices."""
    rng = np.random.default_rng(0)
    writer = RunWriter(path)
    writer.set_meta(run_name="synthetic", losses=losses, task=losses[0], every=every,
                    roles={n: "task" if i == 0 else "other" for i, n in enumerate(losses)},
                    shared_parameters=[f"layer{i}.weight" for i in range(30)], shared_numel=10_000)
    n = len(losses)
    for step in range(0, steps, every):
        jac = rng.normal(size=(n, 16)) * np.linspace(1, 0.01, n)[:, None]
        gram = jac @ jac.T
        scalars = {}
        for k, name in enumerate(losses):
            scalars[("loss", name)] = float(np.exp(-step / steps) * (k + 1) + rng.random())
            scalars[("weight", name)] = 1.0 if k == 0 else 0.1
            scalars[("weighted_grad_norm", name)] = float(np.sqrt(gram[k, k]))
            for j in range(k + 1, n):
                scalars[("grad_cosine", f"{name}|{losses[j]}")] = float(
                    gram[k, j] / np.sqrt(gram[k, k] * gram[j, j]))
        writer.write_step(step, scalars, {("grad_gram", "shared"): gram})
    writer.close()


def test_twelve_losses_fit(tmp_path):
    losses = ["task"] + [f"aux_loss_{i:02d}" for i in range(1, 12)]
    synthetic_run(tmp_path / "twelve.gprobe", losses, 60, every=3)
    with load_run(tmp_path / "twelve.gprobe") as twelve:
        figures = dict(report_figures(twelve, []))
    fig = figures["gradients"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    # the loss legend (all 12 names) sits above the plots, overlapping none of them
    legend = fig.legends[0]
    assert len(legend.get_texts()) == 12
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title(loc="left")
    # heatmaps of 12x12: no annotations (they would not fit), but tick labels for every loss
    heatmaps = [ax for ax in fig.axes if ax.get_title(loc="left").startswith(("start", "middle", "end"))]
    assert len(heatmaps) == 3
    assert all(len(ax.texts) == 0 for ax in heatmaps)
    assert len(heatmaps[0].get_yticklabels()) == 12
    # the axes of the page do not overlap each other
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            inter = a.intersection(a, b)
            assert inter is None or inter.width * inter.height < 1.0
    assert list(figures) == ["verdict", "gradients", "losses"]
    close_all(figures.items())


def test_decimation_keeps_extremes_and_bounds_points():
    x = np.arange(1_000_000)
    y = np.sin(x / 1000.0)
    y[123_457] = 50.0
    y[800_001] = -50.0
    y[500_000:500_010] = np.nan
    dx, dy = decimate(x, y)
    assert len(dx) <= MAX_POINTS
    assert np.all(np.diff(dx) > 0)
    assert np.nanmax(dy) == 50.0 and np.nanmin(dy) == -50.0
    assert 123_457 in dx and 800_001 in dx
    short_x, short_y = decimate(x[:100], y[:100])
    assert len(short_x) == 100


def test_long_run_is_decimated(tmp_path):
    synthetic_run(tmp_path / "long.gprobe", ["task", "cont"], MAX_POINTS + 500)
    with load_run(tmp_path / "long.gprobe") as long_run:
        figures = report_figures(long_run, [])
    fig = dict(figures)["gradients"]
    for ax in fig.axes:
        for line in ax.get_lines():
            assert len(line.get_xdata()) <= MAX_POINTS
    close_all(figures)


def test_shaded_labels_sit_above_every_line(figures):
    """A finding's 'shaded: id' label has a band of its own: no line runs under it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    checked = 0
    for name, fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()
        for ax in fig.axes:
            labels = [t for t in ax.texts if t.get_text().startswith("shaded: ")]
            if not labels:
                continue
            bottom = min(t.get_window_extent(renderer).y0 for t in labels)
            for line in ax.get_lines():
                xy = line.get_transform().transform(line.get_xydata())
                y = xy[np.isfinite(xy[:, 1]), 1]
                assert not len(y) or y.max() < bottom, (name, ax.get_title(loc="left"))
            checked += 1
    assert checked >= 3  # the batches, losses and gradient pages mark findings
