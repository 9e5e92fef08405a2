"""The watch methods of :class:`~gradprobe.probe.probe.Probe`: what to record besides the
per-loss gradients (latents, prototypes, sigmoid inputs, contrastive batches). Each registers a
watch with the probe's :class:`~.watchset.WatchSet`; the probe step records it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gradprobe import metrics


class WatchMethods:
    """Mixed into :class:`Probe`, which provides ``self._watches``."""

    _watches: Any

    def watch_latent(self, name: str, module: torch.nn.Module | None = None, *,
                     labels: str | None = None,
                     select: int | str | Callable[[Any], torch.Tensor] | None = None,
                     every: int | None = None) -> None:
        """Record a latent ([batch, dim]): from ``module``'s forward output, or ``observe(name=...)``.

        ``labels``: the name of an observed tensor holding the class label of each row (e.g.
        ``labels="y"`` with ``observe(y=...)``, or ``labels="groups"``). The number of
        classes it shows tells the diagnosis that a supervised latent whose rank settles
        near classes - 1 has the geometry of neural collapse, not a collapse.

        ``select`` picks the latent from a module that returns more than a tensor: an index
        (``select=0`` for ``(rep, mask)``), a key (``select="z"`` for a dict, or an attribute
        of a dataclass or named tuple) or a function of the output (``select=lambda out:
        out.hidden[-1]``). Without it, a tuple or list whose first element is a tensor gives
        that first element (one warning says so). A latent that cannot be read is dropped
        alone, with one warning and a ``watch_disabled`` event; the rest goes on recording.
        """
        self._watches.add_latent(name, module, labels, select, every)

    def watch_prototypes(self, name: str, source: Any, *, latent: str | None = None,
                         groups: str = "groups", every: int | None = None) -> None:
        """Record a prototype matrix (tensor, Parameter, buffer or zero-argument callable).

        ``latent``: the watched latent the prototypes summarise, for usage and lag.
        ``groups``: the name of the observed tensor holding each latent row's prototype id
        (the row of the table it belongs to), for lag: ``observe(groups=...)`` by default;
        a model with several tables (residual codebooks, one router per layer) names each
        table's own, e.g. ``groups="codes_0"`` with ``observe(codes_0=...)``.
        """
        self._watches.add_prototypes(name, source, latent, groups, every)

    def watch_saturation(self, name: str, module: torch.nn.Module | None = None, *,
                         temperature: Any = None, threshold: float = metrics.SATURATION_THRESHOLD,
                         terms: tuple[str, str] | None = None, target: str | None = None,
                         every: int | None = None) -> None:
        """Record the inputs of a sigmoid (its logits).

        ``module``: an ``nn.Sigmoid`` (its input is recorded), or the layer that computes the
        logits a functional ``torch.sigmoid`` then reads (its *output* is recorded); without
        a module, the logits passed as ``observe(name=...)``. ``target``: the name of an
        observed tensor holding what each sigmoid output is trained towards (0/1 labels or
        probabilities, one per logit), e.g. ``target="y"`` with ``observe(y=...)``: the
        diagnosis then tells a saturation towards the targets (harmless) from one on the
        wrong side of them. ``temperature``: a number or callable recorded beside it;
        ``terms``: the names of two energy terms passed to ``observe`` (e.g.
        ``("U_I", "R_E")``) whose scale ratio is kept.
        """
        self._watches.add_saturation(name, module, temperature, threshold, terms, target, every)

    def watch_contrastive(self, name: str, *, temperature: float = 0.1,
                          every: int | None = None) -> None:
        """Record an InfoNCE batch passed as ``observe(name=(anchors, positives))``."""
        self._watches.add_contrastive(name, temperature, every)
