"""The report stage's shape and the definitions it shares with the diagnosis: its modules stay
small and import only each other's public names, the training path never loads matplotlib, the
verdict's "fixed" weight is the static-loss-weights rule's, and the severity counts read the
same in every view."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gradprobe.diagnose import Finding, Thresholds
from gradprobe.diagnose import is_fixed_weight
from gradprobe.record import RunWriter, load_run

REPORT = Path(__file__).resolve().parents[1] / "gradprobe" / "report"
MODULES = sorted(REPORT.rglob("*.py"))


def test_report_modules_stay_small_and_share_only_public_names():
    assert len(MODULES) > 10  # the package was found (an empty glob would pass anything)
    lengths = {str(p.relative_to(REPORT)): len(p.read_text().splitlines()) for p in MODULES}
    assert max(lengths.values()) <= 500, lengths
    private = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or "gradprobe" in
                                                     (node.module or "")):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.endswith("__")]
    assert private == []


def test_training_and_diagnosing_never_import_matplotlib(tmp_path):
    """A probed training loop, the diagnosis, the CLI module and the report's terminal view
    load no plotting library; the report's PDF does (so the check can fail)."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        import gradprobe, gradprobe.cli
        from gradprobe.diagnose import diagnose
        torch.manual_seed(0)
        trunk, head_a, head_b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
        model = torch.nn.ModuleList([trunk, head_a, head_b])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = gradprobe.Probe(model, shared=trunk, every=2, run_file={str(tmp_path / 'r.gprobe')!r})
        for step in range(8):
            h = torch.relu(trunk(torch.randn(16, 4)))
            probe.backward({{"a": head_a(h).pow(2).mean(), "b": head_b(h).abs().mean()}})
            opt.step(); opt.zero_grad()
        probe.close()
        findings = diagnose(gradprobe.load_run({str(tmp_path / 'r.gprobe')!r}))
        from gradprobe.report import summary_lines
        print(sorted(m for m in ("matplotlib", "seaborn") if m in sys.modules))
        from gradprobe.report import write_pdf
        print(sorted(m for m in ("matplotlib", "seaborn") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "['matplotlib', 'seaborn']"]


def test_a_fixed_weight_is_a_range_within_the_tolerance_of_the_largest_magnitude():
    tolerance = Thresholds().static_weight_tolerance
    assert tolerance == 1e-9
    assert is_fixed_weight(np.full(50, 0.05), tolerance)
    # float noise a thousand times below the tolerance: still one weight
    assert is_fixed_weight(0.05 * (1 + 1e-12 * np.sin(np.arange(50))), tolerance)
    # a range of 1e-6 of the weight (1000x the tolerance): a schedule, however slow
    assert not is_fixed_weight(np.linspace(0.05, 0.05 * (1 + 1e-6), 50), tolerance)
    assert not is_fixed_weight(np.linspace(0.0, 1.0, 50), tolerance)
    assert is_fixed_weight(np.array([1.0, np.nan, 1.0, np.inf]), tolerance)  # gaps ignored
    assert not is_fixed_weight(np.array([np.nan, np.nan]), tolerance)
    assert is_fixed_weight(np.zeros(5), tolerance)
    assert not is_fixed_weight(np.array([-1.0, 1.0]), 1.0) and is_fixed_weight(
        np.array([-1.0, 1.0]), 2.0)  # range 2 against the largest magnitude 1


def test_the_verdict_calls_a_weight_fixed_as_the_diagnosis_does(tmp_path):
    """Weights 0.05 constant, 0.05 with float noise (fixed for the rule) and a slow ramp."""
    from gradprobe.report import report_figures

    writer = RunWriter(tmp_path / "w.gprobe")
    writer.set_meta(run_name="w", losses=["task", "noisy", "ramp"], task="task", every=1,
                    roles={})
    for step in range(20):
        writer.write_step(step, {("loss", "task"): 1.0 / (step + 1), ("loss", "noisy"): 1.0,
                                 ("loss", "ramp"): 1.0, ("weight", "task"): 0.05,
                                 ("weight", "noisy"): 0.05 * (1 + 1e-12 * (-1) ** step),
                                 ("weight", "ramp"): 0.05 + 0.01 * step})
    writer.close()
    with load_run(tmp_path / "w.gprobe") as run:
        pages = dict(report_figures(run, []))
    texts = [t.get_text() for t in pages["verdict"].texts]
    assert texts.count("0.05 (fixed)") == 2
    assert "0.05 → 0.24 (range 0.05–0.24)" in texts


def finding(severity: str, fid: str = "gradient-swamping") -> Finding:
    return Finding(id=fid, severity=severity, title="t", subject="s", key_number="k",
                   evidence={}, why="w", remedy="r")


@pytest.mark.parametrize("severities, words", [
    (["warning", "error", "info", "warning"], "1 error, 2 warnings, 1 {info}"),
    (["info", "info"], "2 {info}s"),
])
def test_the_severity_counts_read_the_same_in_the_terminal_and_the_pdf(severities, words):
    from gradprobe.report import summary_lines
    from gradprobe.report.diagnosis import severity_counts

    findings = [finding(s) for s in severities]
    summary = {"name": "r", "probe_steps": 3, "last_step": 9, "every": 3, "losses": ["a"]}
    assert summary_lines(summary, findings)[-1] == words.format(info="info")
    assert severity_counts(findings) == words.format(info="note")
    assert severity_counts([]) == ""
