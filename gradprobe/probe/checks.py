"""The probe's argument checks: what the constructor, ``watch_*`` and ``backward`` accept.

Each check reads only shapes, types and names (never a tensor's values) and raises
:class:`ProbeUsageError` with one line naming the problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from gradprobe._warnings import GradprobeDeprecationWarning
from gradprobe.record import ROLES

from .notices import warn_user
from .watches import ProbeUsageError

# Substrings of common loss names, checked in this order, for roles the user did not give.
_ROLE_HINTS = (
    ("task", ("task", "ce", "bce", "mse", "xent", "cls", "pred", "main", "sup")),
    ("contrastive", ("cont", "contrast", "nce", "clr", "simclr", "moco", "triplet")),
    ("prototype", ("proto", "center", "centroid", "cluster")),
    ("orthogonality", ("orth",)),
    ("decorrelation", ("corr", "decor", "hsic", "mi")),
    ("adversarial", ("adv", "domain", "grl", "disc", "dis", "gan")),
    ("alignment", ("transfer", "mmd", "coral", "cmd")),
    ("distillation", ("distill", "kd", "hint", "teacher")),
    ("reconstruction", ("rec", "recon", "ae")),
    ("kl", ("kl", "kld", "prior")),
    ("regularization", ("reg", "l1", "l2", "sparse", "wd", "entropy")),
)

# Hints that match only as a whole word of the name: as prefixes they begin unrelated words
# (a PINN's "continuity" residual, a "distance" loss, a "cmdline", a "mirror" task, a
# "mixup" loss, a "kdtree").
_WORD_ONLY_HINTS = frozenset({"cont", "dis", "cmd", "mi", "kd"})

# Names observe() accepts besides the watches' own.
RESERVED_OBSERVE = ("groups",)


def name_hint(name: str) -> tuple[str, str | None]:
    """The role a loss's name hints at, and the hint (the substring it matched; None: "other")."""
    lowered = name.lower()
    words = lowered.split("_")
    # The longest hint that the name is, has as a word, or starts with: "center" is a prototype
    # loss although it starts with "ce"; ties keep the table's order.
    matches = [(len(h), -order, role, h) for order, (role, hints) in enumerate(_ROLE_HINTS)
               for h in hints
               if h in words or (h not in _WORD_ONLY_HINTS and lowered.startswith(h))]
    if not matches:
        return "other", None
    _, _, role, hint = max(matches)
    return role, hint


def guess_role(name: str) -> str:
    return name_hint(name)[0]


def is_compiled(model: torch.nn.Module) -> bool:
    """A ``torch.compile``d module (possibly inside DDP)."""
    inner = getattr(model, "module", model)
    return any(type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")
               for m in (model, inner))


def run_file_argument(run_file: Any, log: Any) -> Any:
    """The run file's path: ``run_file``, or ``log``, its former name, with a deprecation warning
    (renamed because it read like the ``log()`` method, which records scalars)."""
    if log is None:
        return run_file
    if run_file is not None:
        raise ProbeUsageError("Probe got both run_file= and log= (its former name): pass "
                              "run_file= only")
    warn_user("gradprobe: Probe(log=...) is renamed Probe(run_file=...); log= still works in "
              "this version and will be removed", GradprobeDeprecationWarning)
    return log


def check_construction(model: Any, every: Any, roles: Mapping[str, str] | None,
                       sinks: Iterable[Any], on_finding: Any, findings_every: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ProbeUsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_compiled(model):
        raise ProbeUsageError(
            "Probe cannot attach to a torch.compile'd model: its forward is one fused "
            "autograd node, so every loss appears to reach every parameter (the shared "
            "set and inert losses cannot be found) and forward hooks on its submodules "
            "do not run. Attach the probe to the eager model (compiled._orig_mod) and "
            "train with that model on the runs you want to probe")
    for sink in sinks:
        if not callable(getattr(sink, "write_step", None)):
            raise ProbeUsageError(f"sink {sink!r} has no write_step(step, scalars) method")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                              or every < 1):
        raise ProbeUsageError(f"every must be a positive integer (probe cadence in steps) or "
                              f"None (the default schedule), got {every!r}")
    if on_finding is not None and not callable(on_finding):
        raise ProbeUsageError(f"on_finding must be a callable taking a finding, got "
                              f"{type(on_finding).__name__}")
    if isinstance(findings_every, bool) or not isinstance(findings_every, int) \
            or findings_every < 1:
        raise ProbeUsageError(f"findings_every must be a positive integer (steps), got "
                              f"{findings_every!r}")
    for loss_name, role in (roles or {}).items():
        if role not in ROLES:
            raise ProbeUsageError(f"unknown role {role!r} for loss {loss_name!r}; "
                                  f"roles are: {', '.join(ROLES)}")


def resolve_shared(shared: Any) -> list[torch.Tensor] | None:
    """The shared parameters the user named; None where the probe infers them."""
    if shared is None or (isinstance(shared, str) and shared in ("all", "nearest")):
        return None
    if isinstance(shared, torch.nn.Module):
        params = [p for p in shared.parameters() if p.requires_grad]
    elif isinstance(shared, torch.Tensor):
        params = [shared]
    elif isinstance(shared, Iterable) and not isinstance(shared, str):
        params = list(shared)
    else:
        raise ProbeUsageError(f"shared must be a module, parameters, None, 'all' or 'nearest', "
                              f"got {shared!r}")
    if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ProbeUsageError("shared must name at least one parameter that requires grad")
    return params


def check_new_name(name: Any, taken: set[str]) -> None:
    if not isinstance(name, str) or not name or "|" in name:
        raise ProbeUsageError(f"watch names must be non-empty strings without '|', got {name!r}")
    if name in taken:
        raise ProbeUsageError(f"the name {name!r} is already watched (names must be unique)")


def check_observed_name(what: str, value: Any, watched: set[str], *,
                        allow_groups: bool = True) -> None:
    """A watch's extra input: the name of a tensor passed to ``observe`` that no watch
    records itself (several watches may share it)."""
    if value is None or (allow_groups and value == "groups"):
        return
    if not isinstance(value, str) or not value or "|" in value or value in watched:
        raise ProbeUsageError(f"{what} must name a tensor passed to observe() that is not "
                              f"itself watched, got {value!r}")


def check_losses(losses: Any, weights: Mapping[str, Any], known: list[str] | None,
                 task: str | None) -> None:
    """The losses and weights of a ``backward`` call (shapes, dtypes, devices, names)."""
    if not isinstance(losses, Mapping) or not losses:
        raise ProbeUsageError("backward() needs a non-empty dict {loss name: 0-dim tensor}")
    names = list(losses)
    if known is not None and names != known and set(names) != set(known):
        raise ProbeUsageError(f"the losses changed from {known} to {names}; "
                              "pass the same loss names every step")
    device = None
    for loss_name, value in losses.items():
        if not isinstance(loss_name, str) or not loss_name or "|" in loss_name:
            raise ProbeUsageError(f"loss names must be non-empty strings without '|', "
                                  f"got {loss_name!r}")
        if not isinstance(value, torch.Tensor):
            raise ProbeUsageError(f"loss {loss_name!r} is a {type(value).__name__}, "
                                  "expected a 0-dim tensor")
        if value.ndim != 0:
            raise ProbeUsageError(f"loss {loss_name!r} has shape {list(value.shape)}; expected "
                                  "a scalar (0-dim) tensor: reduce it, e.g. with .mean()")
        if not value.is_floating_point():
            raise ProbeUsageError(f"loss {loss_name!r} has dtype {value.dtype}; expected "
                                  "a floating-point tensor")
        if value.device.type == "meta":
            raise ProbeUsageError(f"loss {loss_name!r} is on the meta device (shapes only, no "
                                  "data): compute the losses on a real device")
        if device is not None and value.device != device:
            raise ProbeUsageError(f"loss {loss_name!r} is on {value.device}, the others "
                                  f"on {device}; compute all losses on one device")
        device = value.device
    unknown = sorted(set(weights) - set(losses))
    if unknown:
        raise ProbeUsageError(f"weights for unknown losses {unknown}; the losses are "
                              f"{sorted(losses)}")
    for loss_name, w in weights.items():
        if isinstance(w, torch.Tensor):
            if w.numel() != 1:
                raise ProbeUsageError(f"weight {loss_name!r} must be a float or a 0-dim "
                                      f"tensor, got shape {list(w.shape)}")
        elif isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ProbeUsageError(f"weight {loss_name!r} must be a float or a 0-dim tensor, "
                                  f"got {type(w).__name__} {w!r}")
    if task is not None and task not in losses:
        raise ProbeUsageError(f"task loss {task!r} is not among the losses {names}")


def weight(w: Any) -> float | torch.Tensor:
    """A loss weight in the one form the probe keeps: a float, or the user's one-value tensor."""
    return w.reshape(()) if isinstance(w, torch.Tensor) else float(w)


def logged_values(scalars: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """``log(**scalars)``'s numbers keyed as the run file keeps them (a tensor is read here,
    when the user logs it)."""
    values = {}
    for key, value in scalars.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.numel() != 1:
                raise ProbeUsageError(f"log({key}=...) needs a number, got shape "
                                      f"{list(value.shape)}")
        values[("logged", key)] = float(value)
    return values


def non_finite_parameters(model: torch.nn.Module, names: Mapping[int, str]) -> str | None:
    """When the probe closes: the model's parameters that hold NaN or Inf, as the message of a
    ``non_finite`` event, or None. A run that diverges after its last probe step leaves no
    other trace. One transfer to the host per device; a sharded parameter (DTensor) is read
    through its local shard, so that no rank waits on another. A check that fails is
    reported and reads as finite: closing must not raise."""
    try:
        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for p in model.parameters():
            local = (p.to_local() if hasattr(p, "to_local") else p).detach()
            if local.numel() and local.device.type != "meta":  # a meta tensor holds no values
                by_device.setdefault(local.device, []).append((names.get(id(p), "?"), local))
        bad = []
        for entries in by_device.values():
            finite = torch.stack([t.isfinite().all() for _, t in entries]).cpu().tolist()
            bad += [name for (name, _), ok in zip(entries, finite) if not ok]
    except Exception as exc:  # noqa: BLE001 - a check at close never stops the user's program
        warn_user(f"gradprobe: could not check the parameters at close ({exc})")
        return None
    if not bad:
        return None
    shown = ", ".join(repr(n) for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3
                                                   else "")
    return f"the model's parameters ({shown}) hold NaN or Inf when the probe closes"
