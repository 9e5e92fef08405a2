"""The failure report's "Prototypes" page: drift, distances, usage, staleness and lag of each
watched prototype set."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..context import ReportContext
from .panels import panel_pages

HOW_TO_READ = ("How to read: drift that drops to 0 means stale prototypes (the update stopped); "
               "minimum distance shrinking towards 0 means prototypes merged; usage entropy "
               "near 0 means every sample maps to one prototype.")


def prototype_pages(ctx: ReportContext) -> list[Figure]:
    d = ctx.data
    sets = sorted(set(d.names("prototype_drift")) | set(d.names("prototype_min_distance")) |
                  set(d.names("prototype_usage")))
    if not sets:
        return []
    panels = [
        dict(quantity="prototype_drift", names=sets, log=True,
             ylabel="‖Δp‖ / ‖p‖ per probe interval", title="Prototype drift per probe interval"),
        dict(quantity="prototype_min_distance", names=sets,
             ylabel="distance (latent units, L2)", title="Minimum pairwise prototype distance"),
        dict(quantity="prototype_usage", names=sets, ylim=(-0.02, 1.05),
             ylabel="normalised entropy (0 to 1)", title="Prototype usage entropy"),
        dict(quantity="prototype_steps_since_moved", names=sets,
             ylabel="steps since a prototype moved", title="Staleness (steps since last move)"),
        dict(quantity="prototype_mean_distance", names=sets,
             ylabel="distance (latent units, L2)", title="Mean pairwise prototype distance"),
        dict(quantity="prototype_lag", names=sets,
             ylabel="‖p − group mean‖ / ‖group mean‖", title="Prototype lag behind the features"),
    ]
    return panel_pages(ctx, "prototypes", panels, HOW_TO_READ)
