"""The failure report's "Prototypes" page: drift, distances, usage, staleness and lag of each
watched prototype set."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..context import ReportContext
from .panels import panel_pages

HOW_TO_READ = ("How to read: the diagnosis reports prototype-stale when the drift drops to 0 "
               "(the update stopped) and prototype-collapse when the distances between "
               "prototypes shrink towards 0 (they merge); usage entropy near 0 is every sample "
               "mapping to one prototype.")


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
