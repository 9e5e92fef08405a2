"""``probe-incomplete``: the record has a gap, so an empty list of findings would mean nothing.

A probe that disabled itself records nothing after that step, a dropped watch nothing of its
quantity, and a run without a probe step nothing at all. Each is an error with its reason
(the probe's own ``probe_disabled`` and ``watch_disabled`` events), so that a broken record
never reads as "no failure modes found".
"""

from __future__ import annotations

from typing import Sequence

from gradprobe.record import Run

from .findings import REMEDY, WHY, Finding
from .thresholds import Thresholds

ID = "probe-incomplete"


def _finding(title: str, subject: str, key_number: str, evidence: dict,
             step: int | None) -> Finding:
    return Finding(id=ID, severity="error", title=title, subject=subject, key_number=key_number,
                   evidence=evidence, why=WHY[ID], remedy=REMEDY[ID],
                   steps=None if step is None else (step, step))


def probe_incomplete(run: Run, th: Thresholds, earlier: Sequence[Finding] = ()) -> list[Finding]:
    steps = run.probe_steps()
    recorded = {"probe_steps": int(len(steps)),
                "last_probe_step": int(steps[-1]) if len(steps) else None}
    out = []
    disabled = run.events("probe_disabled")
    if disabled:
        step, message = int(disabled[0]["step"]), disabled[0]["message"]
        out.append(_finding(f"the probe disabled itself at step {step}: {message}", "probe",
                            f"{len(steps)} probe steps before it",
                            {"event": "probe_disabled", "step": step, "message": message,
                             **recorded}, step))
    elif not len(steps):
        out.append(_finding("no probe step was recorded: there is nothing to analyse", "probe",
                            "0 probe steps", {"event": None, "losses": run.losses, **recorded},
                            None))
    dropped: dict[str, dict] = {}
    for event in run.events("watch_disabled"):
        dropped.setdefault(event["name"], event)
    for name, event in dropped.items():
        step = int(event["step"])
        out.append(_finding(f"watch '{name}' was dropped at step {step}: {event['message']}",
                            name, f"dropped at step {step}",
                            {"event": "watch_disabled", "watch": name, "step": step,
                             "message": event["message"], **recorded}, step))
    return out
