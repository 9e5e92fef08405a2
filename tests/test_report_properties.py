"""The report renders every page for any run the probe can write (property-based).

Hypothesis generates runs through the real RunWriter: every quantity the probe records, as
the probe names and shapes it, with series that are all zero, constant, a single point,
NaN or Inf, spread over 600 orders of magnitude, negative, missing from some steps or
missing altogether, for 1 to 20 losses with awkward names, and the probe's events. Each run
is diagnosed and every page is built and drawn; the terminal and JSON views are made too.

Drawing is where the crashes were (matplotlib's marker spacing on an all-zero series on a
log axis, tick locators on limits near 1e308, a '$' in a loss name parsed as TeX), so
every page is drawn. A full draw of a page costs about 0.1 s of CPU, nearly all of it in
matplotlib's tick artists and title layout, which are the same for any data; so the 500
generated runs have every page built, every axis autoscaled with its ticks located and
labelled, and every artist drawn by matplotlib's null renderer (:func:`draw_page`), and
a dozen more are written as complete PDFs (real fonts, TeX parsing, every tick drawn).
``GRADPROBE_HYPOTHESIS=thorough`` runs ten times as many, with a fresh random seed.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.axis import Axis
from matplotlib.backends.backend_template import FigureCanvasTemplate, RendererTemplate

from gradprobe.diagnose import DiagnoseWarning, diagnose
from gradprobe.record import RunWriter, run_from_bytes
from gradprobe.report import findings_json, report_figures, summary_lines, write_pdf
from gradprobe.report.style import report_style

settings.register_profile("default", deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", settings.get_profile("default"), derandomize=False)
settings.load_profile("thorough" if os.environ.get("GRADPROBE_HYPOTHESIS") == "thorough"
                      else "default")
SCALE = 10 if os.environ.get("GRADPROBE_HYPOTHESIS") == "thorough" else 1

ROLES = ("task", "contrastive", "prototype", "orthogonality", "decorrelation", "adversarial",
         "reconstruction", "regularization", "other")
EVENTS = ("non_finite", "inert_loss", "no_shared_path", "skipped_step", "probe_disabled",
          "watch_disabled")

# How one recorded series behaves over its steps.
PATTERNS = ("normal", "zeros", "constant", "nan", "inf", "mixed", "huge_range", "negative",
            "tiny", "huge", "spike", "decaying")


def values(pattern: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if pattern == "zeros":
        return np.zeros(n)
    if pattern == "constant":
        return np.full(n, rng.normal())
    if pattern == "nan":
        return np.full(n, np.nan)
    if pattern == "inf":
        return np.full(n, rng.choice([np.inf, -np.inf]))
    if pattern == "mixed":  # finite with NaN, +Inf and -Inf sprinkled in
        v = rng.normal(size=n)
        v[rng.random(n) < 0.3] = rng.choice([np.nan, np.inf, -np.inf])
        return v
    if pattern == "huge_range":
        return 10.0 ** rng.uniform(-300, 300, size=n)
    if pattern == "negative":
        return -np.abs(rng.normal(size=n)) * 10.0 ** rng.uniform(-3, 3)
    if pattern == "tiny":
        return np.abs(rng.normal(size=n)) * 1e-310  # subnormal
    if pattern == "huge":
        return rng.uniform(1e307, 1.7e308, size=n)
    if pattern == "spike":
        v = np.abs(rng.normal(size=n))
        v[rng.random(n) < 0.1] = 1e12
        return v
    if pattern == "decaying":
        return np.exp(-np.arange(n) / max(n / 4, 1)) * (1 + 0.1 * rng.random(n))
    return np.abs(rng.normal(size=n)) + rng.random()


names = st.one_of(
    st.sampled_from(["task", "cont", "proto", "orth", "adv", "kl", "rec", "val_task"]),
    st.text(st.characters(blacklist_characters="|", blacklist_categories=("Cs",)),
            min_size=1, max_size=12),
    st.sampled_from([r"L$_{rec}$", "x$\\foo$", "a$b", "é ü 漢字", "x" * 120, " ", "a\nb"]),
)

QUANTITY_FAMILIES = {
    "gradients": ("grad_norm", "weighted_grad_norm", "grad_contribution"),
    "latents": ("effective_rank", "effective_rank_isotropic", "effective_rank_centred",
                "participation_ratio", "normalized_std", "latent_norm", "latent_dim",
                "latent_rows"),
    "pairs": ("cka", "max_abs_correlation", "max_abs_correlation_null"),
    "prototypes": ("prototype_min_distance", "prototype_mean_distance", "prototype_rank",
                   "prototype_drift", "prototype_moved_share", "prototype_steps_since_moved",
                   "prototype_usage", "prototype_lag", "prototype_target_shift"),
    "saturation": ("saturated_fraction", "mean_sigmoid_grad", "saturation_threshold",
                   "temperature", "energy_scale_ratio"),
    "contrastive": ("contrastive_loss_ratio", "contrastive_gap",
                    "contrastive_effective_negatives", "contrastive_negatives",
                    "contrastive_same_group_share"),
    "batch": ("groups_per_batch", "group_entropy", "same_group_pair_share", "batch_size"),
}


@st.composite
def generated_runs(draw):
    """Bytes of a run file written by RunWriter, as a probe would write it, and its story."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_losses = draw(st.one_of(st.sampled_from([1, 2, 20]), st.integers(1, 6)))
    losses = draw(st.lists(names, min_size=n_losses, max_size=n_losses, unique=True))
    n_steps = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(3, 40)))
    spacing = draw(st.sampled_from([1, 3, 64, 10_000_000]))
    steps = np.cumsum(rng.integers(1, 3, size=n_steps)) * spacing - spacing
    # a few families per run: each page meets every pattern often, and a run stays quick
    families = draw(st.sets(st.sampled_from(sorted(QUANTITY_FAMILIES) + [
        "gram", "weights", "logged", "spectra", "histograms"]), max_size=4))
    pattern = st.sampled_from(PATTERNS)
    latents = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    watched = {"latents": latents, "prototypes": {latents[0]: latents[0]},
               "saturations": latents[:2], "contrastive": latents[:1]}
    every = draw(st.sampled_from([None, 1, 7]))
    writer = RunWriter(None)
    writer.set_meta(run_name=draw(names), losses=losses, task=draw(st.sampled_from(losses)),
                    roles={n: draw(st.sampled_from(ROLES)) for n in losses},
                    roles_guessed=losses[1:], every=every,
                    cadence="default" if every is None else f"every {every} steps",
                    shared_parameters=[f"trunk.{i}.weight" for i in range(draw(
                        st.integers(0, 40)))],
                    shared_numel=draw(st.integers(0, 10**9)),
                    expect_groups_per_batch=draw(st.sampled_from([None, 1, 4])),
                    max_rows=1024, backward_path="separate", **watched)
    series: dict[tuple[str, str], np.ndarray] = {}
    present: dict[tuple[str, str], np.ndarray] = {}

    def add(quantity: str, name: str) -> None:
        series[(quantity, name)] = values(draw(pattern), n_steps, rng)
        # missing series: a series may skip steps (never recorded there)
        present[(quantity, name)] = rng.random(n_steps) > draw(st.sampled_from([0.0, 0.0, 0.5]))

    for name in losses:
        add("loss", name)
        if "weights" in families:
            add("weight", name)
        if "gradients" in families:
            for q in QUANTITY_FAMILIES["gradients"]:
                add(q, name)
    if "gradients" in families:
        for i, a in enumerate(losses[:6]):
            for b in losses[i + 1:6]:
                add("grad_cosine", f"{a}|{b}")
                add("grad_dot", f"{a}|{b}")
        add("combined_grad_norm", "shared")
    for family, who in (("latents", latents), ("prototypes", latents[:1]),
                        ("saturation", latents[:2]), ("contrastive", latents[:1]),
                        ("batch", ["batch"])):
        if family in families:
            for q in QUANTITY_FAMILIES[family]:
                for name in who:
                    add(q, name)
    if "pairs" in families and len(latents) > 1:
        for q in QUANTITY_FAMILIES["pairs"]:
            add(q, f"{latents[0]}|{latents[1]}")
    if "logged" in families:
        for name in ("val_task", "val_accuracy", "lr"):
            add("logged", name)
    for i, step in enumerate(steps.tolist()):
        scalars = {key: float(v[i]) for key, v in series.items() if present[key][i]}
        arrays = {}
        if "gram" in families:
            gram = values(draw(pattern), n_losses * n_losses, rng).reshape(n_losses, n_losses)
            arrays[("grad_gram", "shared")] = (gram + gram.T) / 2
        if "spectra" in families:
            arrays[("singular_spectrum", latents[0])] = values(
                draw(pattern), draw(st.integers(1, 32)), rng).astype(np.float32)
        if "histograms" in families:
            arrays[("saturation_histogram", latents[0])] = np.abs(values(draw(pattern), 41, rng))
        writer.write_step(int(step), scalars, arrays)
    for kind in draw(st.lists(st.sampled_from(EVENTS), max_size=4)):
        step = int(steps[rng.integers(n_steps)]) if n_steps else 0
        writer.add_event(step, kind, draw(st.sampled_from(losses + latents + ["probe"])),
                         draw(names))
    return writer.to_bytes()


def diagnosed(data: bytes):
    run = run_from_bytes(data, "generated.gprobe")
    with warnings.catch_warnings():
        # a rule that cannot judge odd data says so and is skipped: the report goes on
        warnings.simplefilter("ignore", DiagnoseWarning)
        findings = diagnose(run)
    return run, findings


def other_views(run, findings) -> None:
    lines = summary_lines(run.summary(), findings)
    assert lines[0].startswith(f"run {run.name}")
    document = json.loads(findings_json(run.summary(), findings))
    assert [f["id"] for f in document["findings"]] == [f.id for f in findings]


def draw_page(fig) -> None:
    """What of drawing a page depends on the run: every axis autoscaled to the data, its
    major and minor ticks located and labelled by its own locator and formatter, and every
    artist (lines, markers, spans, bars, heatmaps, texts, legends) drawn by the null
    renderer. Tick artists themselves are not made (their look is the same for any run)."""
    FigureCanvasTemplate(fig)
    renderer = RendererTemplate(fig.dpi)
    for ax in fig.axes:
        ax.get_xlim(), ax.get_ylim()
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_major_formatter().format_ticks(axis.get_major_locator()())
            axis.get_minor_formatter().format_ticks(axis.get_minor_locator()())
        for artist in ax.get_children():
            if not isinstance(artist, Axis):
                artist.draw(renderer)
    for artist in fig.legends + fig.texts + fig.patches + fig.lines:
        artist.draw(renderer)


@settings(max_examples=500 * SCALE)
@given(generated_runs())
def test_every_page_of_any_run_draws(data):
    run, findings = diagnosed(data)
    other_views(run, findings)
    pages = report_figures(run, findings)
    assert pages[0][0] == "verdict"
    with report_style():
        for _, fig in pages:
            draw_page(fig)


@settings(max_examples=12 * SCALE)
@given(data=generated_runs())
def test_any_run_writes_a_complete_pdf(tmp_path_factory, data):
    run, findings = diagnosed(data)
    pdf = tmp_path_factory.mktemp("pdf") / "report.pdf"
    write_pdf(run, findings, pdf)
    with open(pdf, "rb") as fh:
        head = fh.read(5)
    assert head == b"%PDF-"


@pytest.mark.parametrize("name", [r"L$_{rec$", "x$\\foo$"])
def test_names_that_look_like_tex_are_drawn_as_text(name, tmp_path):
    writer = RunWriter(None)
    losses = ["task", name]
    writer.set_meta(run_name=name, losses=losses, task="task", every=1, roles={},
                    shared_parameters=[], shared_numel=0)
    for step in range(4):
        writer.write_step(step, {**{("loss", n): 1.0 + step + k for k, n in enumerate(losses)},
                                 **{("weighted_grad_norm", n): 1.0 for n in losses},
                                 ("grad_cosine", f"task|{name}"): 0.5},
                          {("grad_gram", "shared"): np.eye(2)})
    run = run_from_bytes(writer.to_bytes(), "tex.gprobe")
    write_pdf(run, [], tmp_path / "tex.pdf")
    pypdf = pytest.importorskip("pypdf")
    text = "\n".join(page.extract_text() for page in pypdf.PdfReader(tmp_path / "tex.pdf").pages)
    assert name.replace("$", "") in text.replace("$", "") or name in text
