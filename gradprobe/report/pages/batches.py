"""The failure report's "Batches and contrastive negatives" page: groups per batch against the
declared sampler, same-group pairs, and the InfoNCE signal of each contrastive watch."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..axes import plot_series
from ..context import ReportContext
from .panels import panel_pages

HOW_TO_READ = ("How to read: the batches should hold what the sampler declares (training and "
               "inference must match). The diagnosis reports batch-composition-mismatch when "
               "they do not, and weak-contrastive-signal when InfoNCE stays near chance with "
               "most negatives from the anchor's own group.")


def batch_pages(ctx: ReportContext) -> list[Figure]:
    d = ctx.data
    cont = sorted(set(d.names("contrastive_effective_negatives")) |
                  set(d.names("contrastive_loss_ratio")))
    panels = []
    if d.has("groups_per_batch", "batch"):
        panels.append(dict(quantity="groups_per_batch", names=["batch"],
                           draw=lambda ax: _groups_panel(ctx, ax)))
    if d.has("same_group_pair_share"):
        panels.append(dict(quantity="same_group_pair_share", names=["batch"], ylim=(-0.02, 1.02),
                           ylabel="share of sample pairs", title="Same-group pairs in a batch"))
    if cont:
        panels.append(dict(quantity="contrastive_effective_negatives", names=cont,
                           draw=lambda ax: _negatives_panel(ctx, ax, cont)))
        panels.append(dict(quantity="contrastive_loss_ratio", names=cont, ylim=(0, None),
                           refs=[(1.0, "chance: log(K+1)")], ylabel="InfoNCE / log(K+1) (ratio)",
                           title="Contrastive loss relative to chance"))
        panels.append(dict(quantity="contrastive_same_group_share", names=cont,
                           ylim=(-0.02, 1.02), ylabel="share of negatives",
                           title="Negatives from the anchor's own group"))
        panels.append(dict(quantity="contrastive_gap", names=cont,
                           refs=[(0.0, "0")], ylabel="similarity gap (cosine units)",
                           title="Positive minus hardest negative"))
    return panel_pages(ctx, "batches", panels, HOW_TO_READ)


def _groups_panel(ctx: ReportContext, ax) -> None:
    expect = ctx.run.meta.get("expect_groups_per_batch")
    x, y = ctx.data.plotted("groups_per_batch", "batch")
    plot_series(ax, x, y, ctx.palette.other("batch"), label="seen in the batch",
                emphasis="batch" in ctx.flagged_names("groups_per_batch"))
    if expect is not None:
        ax.axhline(expect, color="#222222", linestyle=(0, (5, 2)), linewidth=1.2,
                   label=f"declared: {expect}")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("distinct groups per batch (count)")
    ax.set_title("Groups per batch against the declared sampler" if expect is not None
                 else "Groups per batch (nothing declared)")
    ax.legend(loc="best", fontsize=7)
    ctx.step_axis(ax)


def _negatives_panel(ctx: ReportContext, ax, cont: list[str]) -> None:
    d = ctx.data
    for name in cont:
        style = ctx.palette.other(name)
        if d.has("contrastive_effective_negatives", name):
            x, y = d.plotted("contrastive_effective_negatives", name)
            plot_series(ax, x, y, style, label=f"{name}: effective")
        if d.has("contrastive_negatives", name):
            x, y = d.plotted("contrastive_negatives", name)
            ax.plot(x, y, color=style["color"], linestyle=":", linewidth=1.0,
                    label=f"{name}: nominal (batch − 1)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("negatives (count)")
    ax.set_title("Effective InfoNCE negatives")
    ax.legend(loc="best", fontsize=7)
    ctx.step_axis(ax)
