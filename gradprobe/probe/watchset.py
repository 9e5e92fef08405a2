"""The probe's watches: registered by the user's names, the hooks that capture their tensors on
probe steps, and what ``observe`` hands over. The loop-facing methods (``watch_latent``, ...)
are :class:`~.probe.Probe`'s; this is where they keep their state.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import checks
from .checks import RESERVED_OBSERVE
from .notices import warn_user
from .watches import (ContrastiveWatch, LatentWatch, PrototypeWatch, ProbeUsageError,
                      SaturationWatch)


class WatchSet:
    """Every watch of one probe and what they captured at the current probe step.

    ``probing``: whether the current step records (the hooks capture only then).
    """

    def __init__(self, probing: Callable[[], bool]):
        self.latents: dict[str, LatentWatch] = {}
        self.prototypes: dict[str, PrototypeWatch] = {}
        self.saturations: dict[str, SaturationWatch] = {}
        self.contrastive: dict[str, ContrastiveWatch] = {}
        self.captured: dict[str, Any] = {}
        self._probing = probing

    # -- registering -----------------------------------------------------------------

    def check_new_name(self, name: Any) -> None:
        checks.check_new_name(name, self.observable_names() | set(self.prototypes))

    def check_observed_name(self, what: str, value: Any, name: str, *,
                            allow_groups: bool = True) -> None:
        watched = {name, *self.latents, *self.saturations, *self.contrastive,
                   *self.prototypes, *RESERVED_OBSERVE}
        checks.check_observed_name(what, value, watched, allow_groups=allow_groups)

    def add_latent(self, name: str, module: torch.nn.Module | None, labels: str | None,
                   select: Any, every: int | None) -> None:
        self.check_new_name(name)
        self.check_observed_name(f"latent {name!r}: labels", labels, name)
        watch = LatentWatch(name, module, labels, every, select)
        if module is not None:
            watch.handle = module.register_forward_hook(self._capture_output(name))
        self.latents[name] = watch

    def add_prototypes(self, name: str, source: Any, latent: str | None, groups: str,
                       every: int | None) -> None:
        self.check_new_name(name)
        if not (isinstance(source, torch.Tensor) or callable(source)):
            raise ProbeUsageError(f"prototypes {name!r}: pass a tensor, Parameter, buffer or a "
                                  f"zero-argument callable, got {type(source).__name__}")
        self.check_observed_name(f"prototypes {name!r}: groups", groups, name)
        self.prototypes[name] = PrototypeWatch(name, source, latent, groups, every)

    def prototype_tables(self) -> dict[str, torch.Tensor]:
        """The watched prototype tables that a loss can reach, by name: those given as a
        leaf tensor that requires grad (a Parameter). A callable source is not called here:
        the probe calls user code only where it records (on a probe step's watches), never
        once more for itself."""
        return {name: watch.source for name, watch in self.prototypes.items()
                if isinstance(watch.source, torch.Tensor) and watch.source.requires_grad
                and watch.source.grad_fn is None and watch.disabled is None}

    def add_saturation(self, name: str, module: torch.nn.Module | None, temperature: Any,
                       threshold: float, terms: tuple[str, str] | None, target: str | None,
                       every: int | None) -> None:
        self.check_new_name(name)
        for term in terms or ():
            self.check_new_name(term)
        self.check_observed_name(f"saturation {name!r}: target", target, name,
                                 allow_groups=False)
        watch = SaturationWatch(name, module, temperature, threshold,
                                tuple(terms) if terms else None, target, every)
        if isinstance(module, torch.nn.Sigmoid):
            watch.handle = module.register_forward_pre_hook(self._capture_input(name))
        elif module is not None:
            watch.handle = module.register_forward_hook(self._capture_output(name))
        self.saturations[name] = watch

    def add_contrastive(self, name: str, temperature: float, every: int | None) -> None:
        self.check_new_name(name)
        self.contrastive[name] = ContrastiveWatch(name, temperature, every)

    # -- capturing ---------------------------------------------------------------------

    def _capture_output(self, name: str) -> Callable:
        def hook(module, inputs, output):
            if self._probing():
                self.captured[name] = output
        return hook

    def _capture_input(self, name: str) -> Callable:
        def hook(module, inputs):
            if self._probing() and inputs:
                self.captured[name] = inputs[0]
        return hook

    def observable_names(self) -> set[str]:
        """Every name ``observe`` accepts: the watches fed by it, energy terms, ``groups``."""
        names = set(self.latents) | set(self.saturations) | set(self.contrastive) | \
            set(RESERVED_OBSERVE)
        for watch in self.saturations.values():
            names.update(watch.observed_names())
        names.update(w.labels for w in self.latents.values() if w.labels)
        names.update(w.groups for w in self.prototypes.values())
        return names

    def gathered_names(self) -> list[str]:
        """Watched tensors whose statistics use every rank's rows under DDP (the same list on
        all ranks). Contrastive pairs stay per rank: an InfoNCE loss computed on each rank sees
        only its own batch as negatives, so that batch is what its signal describes."""
        return sorted(self.observable_names() - set(self.contrastive))

    def observe(self, tensors: dict[str, Any]) -> None:
        known = self.observable_names()
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise ProbeUsageError(f"observe() got {', '.join(map(repr, unknown))}, which no watch "
                                  f"expects; watched names: {', '.join(sorted(known))}")
        if self._probing():
            self.captured.update(tensors)

    def pick_latents(self, drop: Callable[[Any, BaseException], None],
                     note: Callable[[str, str], None]) -> None:
        """Each latent watch's tensor from what its hook or ``observe`` captured; a watch that
        cannot read it is dropped (``drop(watch, exc)``) before any gradient is taken; a
        tensor taken by convention is noted (``note(name, message)``)."""
        for name, watch in self.latents.items():
            if name not in self.captured:
                continue
            if watch.disabled is not None:
                del self.captured[name]
                continue
            try:
                self.captured[name], message = watch.pick(self.captured[name])
            except Exception as exc:  # a select function of the user's may raise anything
                del self.captured[name]
                drop(watch, exc)
                continue
            if message is not None:
                note(name, message)

    @staticmethod
    def due(watch: Any, step: int) -> bool:
        return watch.disabled is None and (watch.every is None or step % watch.every == 0)

    @staticmethod
    def unhook(watch: Any) -> None:
        if watch.handle is not None:
            watch.handle.remove()
            watch.handle = None

    def release(self, watch: Any, step: int) -> None:
        """The rest of disabling a watch: its hook removed, one warning."""
        self.unhook(watch)
        warn_user(f"gradprobe: step {step}: watch {watch.name!r} disabled ({watch.disabled}); "
                  "the losses and the other watches go on recording")

    def remove_hooks(self) -> None:
        for watch in list(self.latents.values()) + list(self.saturations.values()):
            self.unhook(watch)
