"""The failure report's "Representations" page: each watched latent's effective rank and
normalised std against their healthy references, its singular value spectrum at three moments,
and the dependence between the latents (CKA, max |corr| against the independence null)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..axes import plot_series
from ..context import PAGE_TITLES, ReportContext
from ..style import MOMENT_COLOURS, MOMENT_STYLES
from ..text import clip, step_label

HOW_TO_READ = ("How to read: a healthy latent keeps its effective rank and normalised std near "
               "the dotted isotropic reference. The diagnosis reports representation-collapse "
               "when a latent's rank or spread ends far below it (a rank that merely falls is "
               "not one), and latent-dependence when CKA or |corr| stays far above the null.")
MAX_SPECTRA = 4


def representation_pages(ctx: ReportContext) -> list[Figure]:
    data = ctx.data
    latents = sorted(set(data.names("effective_rank")) | set(data.names("normalized_std")) |
                     set(data.array_names("singular_spectrum")))
    pairs = sorted(set(data.names("cka")) | set(data.names("max_abs_correlation")))
    if not latents and not pairs:
        return []
    hits = ctx.preview([("effective_rank", False), ("normalized_std", False), ("cka", False),
                        ("max_abs_correlation", False)])
    page = ctx.start_page("representations", hits, HOW_TO_READ, loss_legend=False)
    for name in latents:
        ctx.palette.other(name)  # fix the latents' colours in their order
    rows = []
    if any(data.has("effective_rank", n) or data.has("normalized_std", n) for n in latents):
        rows.append("scalars")
    spectra = [n for n in latents if n in data.array_names("singular_spectrum")]
    if spectra:
        rows.append("spectra")
    if pairs:
        rows.append("pairs")
    gs = page.grid(len(rows), 1, hspace=0.5)
    fig = page.fig
    for r, row in enumerate(rows):
        if row == "scalars":
            sub = gs[r].subgridspec(1, 2, wspace=0.3)
            _latent_panel(ctx, fig.add_subplot(sub[0, 0]), latents, "effective_rank",
                          lambda name: data.plotted("effective_rank_isotropic", name)
                          if data.has("effective_rank_isotropic", name) else None,
                          "effective rank (dimensions)",
                          "Effective rank (dotted: isotropic reference)", legend=True)
            _latent_panel(ctx, fig.add_subplot(sub[0, 1]), latents, "normalized_std",
                          lambda name: _inverse_sqrt(data.plotted("latent_dim", name))
                          if data.has("latent_dim", name) else None,
                          "std of ℓ2-normalised rows", "Normalised std (dotted: 1/√dim)")
        elif row == "spectra":
            shown = spectra[:MAX_SPECTRA]
            sub = gs[r].subgridspec(1, len(shown), wspace=0.3)
            for k, name in enumerate(shown):
                _spectrum_panel(ctx, fig.add_subplot(sub[0, k]), name, ylabel=k == 0)
        else:
            _dependence_panel(ctx, fig.add_subplot(gs[r]), pairs)
    return [fig]


def _inverse_sqrt(series):
    x, y = series
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 and negative values are no points
        return x, 1 / np.sqrt(y)


def _latent_panel(ctx: ReportContext, ax, latents: list[str], quantity: str,
                  reference: Callable, ylabel: str, title: str, legend: bool = False) -> None:
    """One latent quantity over steps, each latent with its healthy reference dotted."""
    flagged = ctx.flagged_names(quantity)
    for name in latents:
        if not ctx.data.has(quantity, name):
            continue
        style = ctx.palette.other(name)
        x, y = ctx.data.plotted(quantity, name)
        plot_series(ax, x, y, style, label=name, emphasis=name in flagged)
        ref = reference(name)
        if ref is not None:
            ax.plot(*ref, color=style["color"], linestyle=":", linewidth=1.0, alpha=0.9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    if legend and ax.get_legend_handles_labels()[0]:  # no latent drawn: no legend
        ax.legend(loc="lower left", fontsize=7)
    ctx.mark(ax, quantity, PAGE_TITLES["representations"])
    ctx.step_axis(ax)


def _spectrum_panel(ctx: ReportContext, ax, name: str, ylabel: bool) -> None:
    """σᵢ/σ₁ of one latent at the start, middle and end (light to dark)."""
    for (label, step, s), colour, ls in zip(ctx.data.snapshots("singular_spectrum", name),
                                            MOMENT_COLOURS, MOMENT_STYLES):
        s = np.asarray(s, float)
        # An infinite σ₁ leaves no finite ratio to draw on a log scale.
        if not len(s) or not np.isfinite(s[0]) or not s[0] > 0:
            continue
        with np.errstate(invalid="ignore", over="ignore"):  # inf singular values are no points
            relative = s / s[0]
        ax.plot(np.arange(1, len(s) + 1), relative, color=colour, linestyle=ls, marker="o",
                markersize=2.5, linewidth=1.3, label=f"{label} (step {step_label(step)})")
    if ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    if ylabel:
        ax.set_ylabel("σᵢ / σ₁ (ratio)")
    ax.set_title(f"Spectrum of {clip(name, 16)}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=6.5)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def _dependence_panel(ctx: ReportContext, ax, pairs: list[str]) -> None:
    data = ctx.data
    flagged = ctx.flagged_names("cka") | ctx.flagged_names("max_abs_correlation")
    for pair in pairs:
        style = ctx.palette.other(pair)
        if data.has("cka", pair):
            x, y = data.plotted("cka", pair)
            plot_series(ax, x, y, {**style, "linestyle": "-"}, label=f"CKA {pair}",
                        emphasis=pair in flagged)
        if data.has("max_abs_correlation", pair):
            x, y = data.plotted("max_abs_correlation", pair)
            plot_series(ax, x, y, {**style, "linestyle": (0, (5, 2)), "marker": "s"},
                        label=f"max |corr| {pair}", emphasis=pair in flagged)
        if data.has("max_abs_correlation_null", pair):
            x, y = data.plotted("max_abs_correlation_null", pair)
            ax.plot(x, y, color=style["color"], linestyle=":", linewidth=1.0,
                    label=f"|corr| null {pair}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("CKA, max |corr| (0 to 1)")
    ax.set_title("Dependence between the latents (dotted: max |corr| of independent latents)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    ctx.mark(ax, "cka", PAGE_TITLES["representations"])
    ctx.mark(ax, "max_abs_correlation", PAGE_TITLES["representations"])
    ctx.step_axis(ax)
