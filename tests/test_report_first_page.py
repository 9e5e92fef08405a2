"""The report's first page carries the facts: every finding's title in full (read back from the
PDF with pypdf), on the demo and on a ten-loss run whose findings do not all fit, where page 1
keeps every error and warning title and says where the rest is."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pypdf = pytest.importorskip("pypdf")

from gradprobe import Probe, load_run  # noqa: E402
from gradprobe.demo import train as train_demo  # noqa: E402
from gradprobe.diagnose import diagnose  # noqa: E402
from gradprobe.report import write_pdf  # noqa: E402

DEMO_STEPS = 300  # the demo's failure shows by then (swamping, fixed weights, weak negatives)


def normalised(text: str) -> str:
    return " ".join(text.split())


def page_texts(path) -> list[str]:
    return [normalised(page.extract_text()) for page in pypdf.PdfReader(str(path)).pages]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_demo("failing", steps=DEMO_STEPS, seed=0, out_dir=out, progress=False)
    finally:
        torch.set_num_threads(threads)
    run = load_run(result["run_path"])
    findings = diagnose(run)
    yield run, findings, page_texts(write_pdf(run, findings, out / "failing.pdf"))
    run.close()


def test_demo_page_one_holds_every_title_in_full(demo):
    run, findings, pages = demo
    assert len(findings) >= 4
    assert {f.id for f in findings} >= {"gradient-swamping", "static-loss-weights"}
    for f in findings:
        assert normalised(f.title) in pages[0], f.title
    # the possessive of a quoted name reads as English
    swamped = [f.title for f in findings if f.id == "gradient-swamping"]
    assert all("of that of 'task'" in t and "''s" not in t for t in swamped)
    # where the rest is: the details' first page, which holds them
    start = int(re.search(r"'Findings in detail' pages, from page (\d+)", pages[0]).group(1))
    assert "Findings in detail" in pages[start - 1]
    assert findings[0].why.split()[0] in pages[start - 1]


@pytest.fixture(scope="module")
def ten_losses(tmp_path_factory):
    """A trunk with ten heads: 'task' at weight 1 and nine auxiliary regressions at 1e-3,
    each swamped by the task (nine warnings or errors and a fixed-weights warning). The ten
    read columns of one output layer, so the graph shows the nine as terms on the task's
    forward pass (docs/findings.md, gradient-swamping): they are declared tasks, as a user
    of such a head declares them."""
    path = tmp_path_factory.mktemp("ten") / "ten.gprobe"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(256, 12, generator=gen)
        targets = torch.randn(12, 10, generator=gen)
        y = torch.tanh(x @ targets)
        y[:, 0] *= 30.0  # the task's scale dwarfs the others'
        trunk = nn.Sequential(nn.Linear(12, 32), nn.Tanh())
        heads = nn.Linear(32, 10)
        model = nn.ModuleDict(dict(trunk=trunk, heads=heads))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        names = ["task"] + [f"aux_{k}" for k in range(1, 10)]
        weights = {n: 1e-3 for n in names[1:]}
        with Probe(model, shared=trunk, every=2, run_file=path, task="task",
                   roles={n: "task" for n in names[1:]}) as probe:
            for _ in range(120):
                idx = torch.randint(0, len(x), (64,), generator=gen)
                out = heads(trunk(x[idx]))
                losses = {n: F.mse_loss(out[:, k], y[idx, k]) for k, n in enumerate(names)}
                probe.backward(losses, weights=weights)
                opt.step()
                opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    run = load_run(path)
    findings = diagnose(run)
    yield run, findings, page_texts(write_pdf(run, findings, path.with_suffix(".pdf")))
    run.close()


def test_ten_loss_page_one_holds_every_error_and_warning(ten_losses):
    run, findings, pages = ten_losses
    assert len(run.losses) == 10
    harm = [f for f in findings if f.severity in ("error", "warning")]
    assert len([f for f in harm if f.id == "gradient-swamping"]) >= 8
    for f in harm:
        assert normalised(f.title) in pages[0], f.title
    # page 1 says where what it does not show is, and that page holds it
    match = re.search(r"'Findings in detail' pages, from page (\d+)", pages[0])
    assert match
    details = "\n".join(pages[int(match.group(1)) - 1:])
    for f in findings:
        assert normalised(f.remedy)[:60] in details
    left_out = [f for f in findings if normalised(f.title) not in pages[0]]
    for f in left_out:  # only notes may be left to the details, and page 1 counts them
        assert f.severity == "info"
        assert f.id in pages[0]


def test_a_shaded_span_says_why_it_ends(tmp_path):
    """An auxiliary loss at weight 0.01 on a task that memorises 64 random labels: swamped
    until the task has memorised them, where the rule stops judging. The span's end says so
    on the plot, at the step in the finding's evidence."""
    from gradprobe.report import report_figures

    path = tmp_path / "memo.gprobe"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 16, generator=gen)
        y = torch.randint(0, 4, (64,), generator=gen)
        t = torch.randn(64, generator=gen)
        trunk, task, aux = nn.Sequential(nn.Linear(16, 64), nn.ReLU()), nn.Linear(64, 4), \
            nn.Linear(64, 1)
        model = nn.ModuleDict(dict(trunk=trunk, task=task, aux=aux))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        with Probe(model, shared=trunk, every=4, run_file=path, task="task") as probe:
            for _ in range(400):
                h = trunk(x)
                probe.backward({"task": F.cross_entropy(task(h), y),
                                "aux": F.mse_loss(aux(h).squeeze(1), t)}, weights={"aux": 0.01})
                opt.step()
                opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    with load_run(path) as run:
        findings = diagnose(run)
        swamping = next(f for f in findings if f.id == "gradient-swamping")
        memorised = swamping.evidence["task_memorised_at"]
        end = swamping.steps[1]
        assert memorised is not None and 0 <= memorised - end <= 8 < run.probe_steps()[-1] - end
        pages = dict(report_figures(run, findings))
    notes = [t for ax in pages["gradients"].axes for t in ax.texts
             if "memorised" in t.get_text()]
    assert len(notes) == 1
    assert notes[0].get_text() == (f"ends at {end}: the task memorised its data at step "
                                   f"{memorised}, not judged after")
    assert notes[0].xy[0] == end
    for fig in pages.values():
        fig.clear()


def test_captions_state_what_the_run_found():
    """On a run with no representation finding, the representations page says that none is
    marked there and claims no collapse; on one whose collapse is judged on a quantity the
    page does not draw, it says where that finding is."""
    import runs
    from gradprobe.report import report_figures

    for run, collapsed in ((runs.memorising_decoupler(False), False),
                           (runs.shrinking_latent("rank1"), True)):
        findings = diagnose(run)
        marked = [f for f in findings if f.id in ("representation-collapse", "latent-dependence")]
        assert bool(marked) == collapsed, [f.id for f in findings]
        pages = dict(report_figures(run, findings))
        header = " ".join(t.get_text() for t in pages["representations"].texts)
        if collapsed:  # judged on a quantity this page does not draw: it says where it is
            assert ("No finding of this run is marked on this page: its representation-collapse "
                    "is drawn with the quantity it was judged on") in header
            assert marked[0].plot.quantity == "rankme_centred"
        else:
            assert "No finding of this run is marked on this page." in header
            assert "collapsed" not in header and "a rank that merely falls is not one" in header
        for fig in pages.values():
            fig.clear()
