"""Forward every recorded probe step, and each finding as it appears, to a Weights & Biases run.

    import wandb
    from gradprobe.integrations.wandb import WandbSink
    run = wandb.init(project="exp1")
    probe = gradprobe.Probe(model, run_file="run.gprobe", sinks=[WandbSink(run)])

Scalars: each ``(quantity, name)`` is logged as ``gradprobe/<quantity>/<name>`` (pair names keep
their ``a|b`` form, as in TensorBoard) with the probe step as ``gradprobe/step``, the x axis of
every ``gradprobe/*`` metric (``define_metric``). The sink never passes ``step=`` to
``run.log``, so it cannot collide with the steps of your own logging (W&B drops a row logged
at a step lower than its last); each probe step is one row of the run's history.

Findings: the probe diagnoses the run while it trains (``Probe(findings_every=...)``,
docs/live.md) and hands each finding at warning or error to the sink once, when it first
appears: a W&B alert (title ``gradprobe: <id> (<subject>)``, level WARN or ERROR, the finding
and its remedy as text), an entry in the run summary's ``gradprobe/findings`` list, and the
summary key ``gradprobe/finding/<id>/<subject>`` holding ``<severity>: <title> [<key
number>]`` (``wandb leet inspect --summary`` shows it whole, offline too; the console summary
of ``run.finish()`` shows the first 20 characters of the first 10 keys). After training,
``sink.summarize(probe.findings())`` puts the run's final findings in the summary instead.
"""

from __future__ import annotations

from typing import Any, Iterable

try:
    import wandb
except ImportError as exc:
    raise ImportError("gradprobe.integrations.wandb needs Weights & Biases: "
                      "pip install 'gradprobe[wandb]'") from exc


class WandbSink:
    """A probe sink logging scalars and findings to a W&B run (default: the active run)."""

    def __init__(self, run: Any = None, prefix: str = "gradprobe", alerts: bool = True):
        run = run if run is not None else wandb.run
        if run is None or not callable(getattr(run, "log", None)):
            raise TypeError("WandbSink needs a W&B run: call wandb.init() first, or pass the "
                            f"run (got {type(run).__name__})")
        self.run = run
        self.prefix = prefix
        self.alerts = alerts
        self.step_key = f"{prefix}/step"
        self._findings: list[dict] = []  # the summary's gradprobe/findings list
        self._first_seen: dict[tuple[str, str], int] = {}  # (id, subject) -> live step
        self._summary_keys: set[str] = set()  # the per-finding keys written
        run.define_metric(f"{prefix}/*", step_metric=self.step_key)

    @staticmethod
    def key(prefix: str, quantity: str, name: str) -> str:
        return f"{prefix}/{quantity}/{name}"

    def write_step(self, step: int, scalars: dict[tuple[str, str], float]) -> None:
        row: dict[str, float] = {self.key(self.prefix, q, n): v for (q, n), v in scalars.items()}
        row[self.step_key] = step
        self.run.log(row)

    def write_finding(self, step: int, finding: Any) -> None:
        """A finding that first appeared at ``step`` (a :class:`gradprobe.diagnose.Finding`)."""
        self._first_seen.setdefault((finding.id, finding.subject), step)
        self._findings.append(self._entry(finding))
        self.run.summary[f"{self.prefix}/findings"] = list(self._findings)
        self._summarize_one(finding)
        if self.alerts:
            level = wandb.AlertLevel.ERROR if finding.severity == "error" else wandb.AlertLevel.WARN
            self.run.alert(title=f"gradprobe: {finding.id} ({finding.subject})",
                           text=f"step {step}: {finding.title} [{finding.key_number}]. "
                                f"What to do: {finding.remedy}",
                           level=level)

    def summarize(self, findings: Iterable[Any]) -> None:
        """Make the run summary hold ``findings``, the run's findings at its end (every
        severity; ``probe.findings()`` after ``probe.close()``): the ``gradprobe/findings``
        list and one key per finding, dropping the keys of live findings that have cleared."""
        findings = list(findings)
        self._findings = [self._entry(f) for f in findings]
        self.run.summary[f"{self.prefix}/findings"] = list(self._findings)
        stale = set(self._summary_keys)
        for finding in findings:
            stale.discard(self._summarize_one(finding))
        for key in stale:
            del self.run.summary[key]
            self._summary_keys.discard(key)

    def _entry(self, finding: Any) -> dict:
        return {"step": self._first_seen.get((finding.id, finding.subject)), "id": finding.id,
                "severity": finding.severity, "subject": finding.subject,
                "title": finding.title, "key_number": finding.key_number,
                "remedy": finding.remedy}

    def _summarize_one(self, finding: Any) -> str:
        key = "/".join(part for part in (self.prefix, "finding", finding.id, finding.subject)
                       if part)
        self.run.summary[key] = f"{finding.severity}: {finding.title} [{finding.key_number}]"
        self._summary_keys.add(key)
        return key
