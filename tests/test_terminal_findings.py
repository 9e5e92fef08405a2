"""The order and the words of the findings in the terminal, on a real run whose loss turns NaN:
the cause (`non-finite`) first, naming the loss and the step, and every finding with its
remedy on the line below it (`--brief`: without)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import gradprobe
from gradprobe.cli import main
from gradprobe.diagnose import diagnose
from gradprobe.report.terminal import REMEDY_INDENT

from screen import run_on_terminal

NAN_FROM = 30


def _train_until_nan(run_file, steps: int = 60) -> None:
    """Two regression tasks on one trunk; 'b' weighted 0.001 (swamped by 'a' from the start),
    and from step NAN_FROM its loss is the log of a negative number: NaN."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y_a = torch.sin(x @ torch.randn(8, generator=gen))
    y_b = torch.cos(x @ torch.randn(8, generator=gen))
    model = nn.ModuleDict(dict(trunk=nn.Sequential(nn.Linear(8, 32), nn.Tanh()),
                               a=nn.Linear(32, 1), b=nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = gradprobe.Probe(model, shared=model["trunk"], every=2, run_file=run_file,
                            roles={"b": "task"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            h = model["trunk"](x)
            loss_b = F.mse_loss(model["b"](h).squeeze(1), y_b)
            if step >= NAN_FROM:
                loss_b = torch.log(loss_b - 10.0)
            probe.backward({"a": F.mse_loss(model["a"](h).squeeze(1), y_a), "b": loss_b},
                           weights={"b": 0.001})
            opt.step()
            opt.zero_grad()
        probe.close()
    # The warning names the loss, its value and the step, and guesses nothing.
    messages = [str(w.message) for w in caught if "is nan" in str(w.message)]
    assert messages == [f"gradprobe: step {NAN_FROM}: loss 'b' is nan"]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "nan.gprobe"
    _train_until_nan(path)
    return path


def test_a_nan_loss_is_the_first_finding_and_names_the_loss_and_the_step(run_file):
    run = gradprobe.load_run(run_file)
    # The step, independently: the first recorded loss of 'b' that is not finite.
    steps, values = run.series("loss", "b")
    first_nan = int(steps[~np.isfinite(values)][0])
    assert first_nan == NAN_FROM and np.isfinite(run.series("loss", "a")[1]).all()
    found = diagnose(run)
    ids = [f.id for f in found]
    # Swamping of 'b' is found as well; alphabetically it would come first, by cause it does not.
    assert "gradient-swamping" in ids and sorted(ids)[0] == "gradient-swamping"
    first = found[0]
    assert (first.id, first.severity, first.subject) == ("non-finite", "error", "b")
    assert first.title == f"loss 'b' became NaN or Inf at step {first_nan}"
    assert first.steps == (first_nan, int(steps[-1]))
    assert "empty batch" not in str(first.evidence)
    # The JSON and the report read the same order.
    assert gradprobe.diagnose.finding_order(first) < min(map(gradprobe.diagnose.finding_order,
                                                             found[1:]))


def test_every_finding_in_the_terminal_has_its_remedy_line_and_brief_drops_them(run_file):
    found = diagnose(gradprobe.load_run(run_file))
    assert len(found) >= 3
    full = CliRunner().invoke(main, ["analyze", str(run_file)])
    brief = CliRunner().invoke(main, ["analyze", str(run_file), "--brief"])
    assert full.exit_code == brief.exit_code == 0
    lines, brief_lines = full.output.splitlines(), brief.output.splitlines()
    assert lines[0] == "run nan: 30 probe steps (every 2, last step 58); losses: a, b"
    width = max(len(f.id) for f in found)
    expected_findings = [f"  {f.severity:<7} {f.id:<{width}}  {f.title}  [{f.key_number}]"
                         for f in found]
    # The roles block (report/roles.py, tests/test_roles.py): a title, one line per loss.
    assert lines[1].startswith("roles") and [line.split()[0] for line in lines[2:4]] == ["a", "b"]
    assert brief_lines[1:4] == lines[1:4]
    # A pipe: each finding on one line, its remedy on the one line after it.
    assert lines[4:-1] == [line for f, head in zip(found, expected_findings)
                           for line in (head, f"          remedy: {f.remedy}")]
    assert brief_lines[4:-1] == expected_findings
    assert lines[-1] == brief_lines[-1] == "2 errors, 1 warning"


def test_on_a_terminal_the_summary_wraps_to_its_width_under_the_title(run_file):
    from gradprobe.report import summary_lines

    run = gradprobe.load_run(run_file)
    found = diagnose(run)
    one_per_line = summary_lines(run.summary(), found)
    wrapped = summary_lines(run.summary(), found, width=80)
    assert max(map(len, wrapped)) <= 80 < max(map(len, one_per_line))
    # The same words: each wrapped block joins back into its one-line form.
    def words(lines):
        return " ".join(" ".join(lines).split())

    assert words(wrapped) == words(one_per_line)
    remedy_rows = [i for i, line in enumerate(wrapped) if line.startswith("          remedy: ")]
    assert len(remedy_rows) == len(found)


ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _analyze_env(columns: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(OMP_NUM_THREADS="1", TERM="xterm-256color",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return {**env, "COLUMNS": columns} if columns else env


def _words(lines: list[str]) -> list[str]:
    return " ".join(lines).split()


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("sized_by", ["window", "COLUMNS"])
def test_analyze_wraps_to_the_terminal_and_loses_no_word(run_file, tmp_path, sized_by, columns):
    """``gradprobe analyze`` as a real process on a pseudo-terminal ``columns`` wide (its
    window's size), or 200 wide with COLUMNS set to ``columns``: no line runs past the width,
    and the wrapped lines join back into the one-line form a pipe gets (test above)."""
    command = [sys.executable, "-m", "gradprobe.cli", "analyze", str(run_file)]
    # A pipe keeps one line per finding, COLUMNS or not (a parent that loaded readline sets it).
    one_line = subprocess.run(command, capture_output=True, text=True, env=_analyze_env("40"),
                              timeout=300)
    assert one_line.returncode == 0, one_line.stderr
    flat = one_line.stdout.splitlines()
    by_window = sized_by == "window"
    # Standard error (the progress bar drawn while the rules run) to a file: the findings
    # alone on the terminal.
    with open(tmp_path / "stderr", "w") as errors:
        raw = run_on_terminal(command, _analyze_env(None if by_window else str(columns)),
                              timeout=300, columns=columns if by_window else 200, stderr=errors)
    assert "\x1b[31" in raw  # coloured: it was written to a terminal
    wrapped = ANSI.sub("", raw).replace("\r", "").splitlines()
    assert max(map(len, wrapped)) <= columns < max(map(len, flat))
    assert _words(wrapped) == _words(flat)
    # Each finding's title runs on under its first column and its remedy under the id column:
    # every row is a finding's first row, a remedy's first row or indented under one of them.
    found = diagnose(gradprobe.load_run(run_file))
    id_width = max(len(f.id) for f in found)
    heads = [f"  {f.severity:<7} {f.id:<{id_width}}  " for f in found]
    text_column = " " * len(heads[0])
    body = wrapped[wrapped.index(next(r for r in wrapped if r.startswith(heads[0]))):-1]
    starts = [i for i, row in enumerate(body) if any(row.startswith(h) for h in heads)]
    assert len(starts) == len(found)
    for row in body:
        assert row.startswith((*heads, text_column, REMEDY_INDENT)), row
    # The title and key number of each finding, joined back, are its text (no word lost).
    for start, end, finding in zip(starts, starts[1:] + [len(body)], found):
        title_end = next((k for k in range(start + 1, end)
                          if not body[k].startswith(text_column)), end)
        assert _words(body[start:title_end])[2:] == \
            f"{finding.title}  [{finding.key_number}]".split()
        assert body[title_end].startswith(REMEDY_INDENT + "remedy: ")
        assert _words(body[title_end:end]) == ["remedy:", *finding.remedy.split()]


def test_a_gradient_that_turns_nan_before_any_loss_is_named_first(tmp_path):
    """'b''s value stays finite (sqrt of 0) while its gradient is NaN from step 5; the NaN
    reaches the shared layer and 'a''s loss at step 6: the gradient comes first, by its step."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    model = nn.ModuleDict(dict(trunk=nn.Linear(4, 8), a=nn.Linear(8, 1), b=nn.Linear(8, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradprobe.Probe(model, shared=model["trunk"], every=1, run_file=tmp_path / "g.gprobe",
                            roles={"b": "task"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            h = model["trunk"](x)
            loss_b = (model["b"](h) ** 2).mean()
            if step >= 5:
                loss_b = torch.sqrt((h - h.detach()).pow(2).sum())  # 0, with a NaN gradient
            probe.backward({"a": F.mse_loss(model["a"](h).squeeze(1), x[:, 0]), "b": loss_b})
            opt.step()
            opt.zero_grad()
        probe.close()
    assert "gradprobe: step 5: the gradient of loss 'b' on the shared parameters holds NaN " \
        "or Inf" in [str(w.message) for w in caught]
    run = gradprobe.load_run(tmp_path / "g.gprobe")
    steps, values = run.series("loss", "b")
    assert np.isfinite(values[steps == 5]).all()  # the loss itself was finite then
    found = [(f.id, f.subject, f.title) for f in diagnose(run)][:2]
    assert found == [
        ("non-finite", "b", "the gradient of loss 'b' on the shared parameters became NaN or Inf "
                            "at step 5"),
        ("non-finite", "a", "loss 'a' became NaN or Inf at step 6")]


@pytest.mark.parametrize("width", [None, 40])
def test_wrapping_keeps_the_no_break_spaces_a_name_holds(width):
    """The wrap glues units with a character of its own and prints it back as a space; a
    no-break space that is part of a loss's or a run's name is the user's and stays."""
    from gradprobe.report.columns import hanging
    text = "run a\u00a0b: 'val task' fell 0.01 -> 0.98 while 'cls\u00a0x' stalled for long"
    lines = hanging(text, width, "", "  ")
    joined = " ".join(line.strip() for line in lines)
    assert joined == text
    assert all(len(line) <= width for line in lines) if width else len(lines) == 1
    assert "'val task'" in joined and "0.01 -> 0.98" in joined
