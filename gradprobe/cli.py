"""The ``gradprobe`` command: a thin layer over the Python API.

Exit codes: 0 analysed; 1 a finding at or above ``--fail-on``; 2 bad input (one line, no
traceback); 3 an unexpected internal error (one line, no traceback: a bug to report).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import click

from gradprobe._version import __version__


class BadInput(click.ClickException):
    """Bad input: one line naming the problem, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"gradprobe: error: {self.format_message()}", err=True)


class InternalError(click.ClickException):
    """An error gradprobe did not expect: one line, exit code 3 (never 1, which means a
    finding reached ``--fail-on``)."""

    exit_code = 3

    def show(self, file=None) -> None:
        click.echo(f"gradprobe: internal error: {self.format_message()} (please report it, "
                   "with the command that gave it)", err=True)


class _Commands(click.Group):
    """The command group: any exception that is not click's own ends as one line and code 3."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit,
                click.exceptions.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            detail = (str(exc).strip().splitlines() or [""])[0][:300]
            raise InternalError(f"{type(exc).__name__}: {detail}" if detail
                                else type(exc).__name__) from None


def _load(path: str):
    from gradprobe.record import RunFileError, load_run

    try:
        with warnings.catch_warnings():
            # torch warns while refusing a pickle; the refusal itself is the one line we print.
            warnings.simplefilter("ignore")
            return load_run(path)
    except RunFileError as exc:
        raise BadInput(str(exc)) from None


@contextlib.contextmanager
def _damaged_as_bad_input():
    """One line for a damaged page (it surfaces only when read, long after the file opened)
    and for an output that cannot be written."""
    from gradprobe.record import RunFileError

    try:
        yield
    except RunFileError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(f"cannot write {exc.filename or 'the output'}: "
                       f"{exc.strerror or exc}") from None


def _thresholds(config: str | None):
    from gradprobe.diagnose import ConfigError, load_thresholds

    if config is None:
        return None
    try:
        return load_thresholds(config)
    except ConfigError as exc:
        raise BadInput(f"{config}: {exc}") from None
    except OSError as exc:
        raise BadInput(f"{config}: cannot read config ({exc.strerror})") from None


def _diagnose_with_progress(run, thresholds):
    """Diagnose with a progress bar on a terminal (a large run must not look hung)."""
    from gradprobe.diagnose import diagnose

    if not sys.stderr.isatty():
        return diagnose(run, thresholds)
    # A bar narrow enough that the longest rule's label, bar and percentage fit 80 columns
    # (a wider line wraps, and each redraw would leave a row behind).
    with click.progressbar(length=1, label="analysing", file=sys.stderr, width=20) as bar:
        def progress(i: int, n: int, rule: str) -> None:
            bar.length = n
            bar.label = f"analysing ({rule})"
            bar.update(1)
        return diagnose(run, thresholds, progress=progress)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradprobe")
def main() -> None:
    """gradprobe: why did my multi-loss model not train the way it was designed?

    \b
    Record a run by attaching gradprobe.Probe to your training loop, then:
      gradprobe analyze runs/exp1.gprobe              findings in the terminal
      gradprobe analyze run.ckpt -o report.pdf        ... and a PDF failure report
      gradprobe analyze run.ckpt --json - --fail-on error   gate a pipeline on findings
      gradprobe watch runs/exp1.gprobe                 the findings while the run trains
      gradprobe demo                                   the record-22 failure and its fix
    """


@main.command()
@click.argument("path", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", "pdf", type=click.Path(dir_okay=False, path_type=str),
              help="Write the PDF failure report here.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True, path_type=str),
              help="Write the findings as JSON to FILE ('-' for standard output).")
@click.option("--fail-on", type=click.Choice(["warning", "error"]), default=None,
              help="Exit with code 1 when a finding of this severity or worse is present.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=str),
              help="TOML file overriding diagnosis thresholds (see docs/findings.md).")
@click.option("--brief", is_flag=True, help="One line per finding, without its remedy line.")
def analyze(path: str, pdf: str | None, json_out: str | None, fail_on: str | None,
            config: str | None, brief: bool) -> None:
    """Flag the failure modes of a recorded run.

    PATH is a run file written by a Probe (.gprobe) or a checkpoint holding
    probe.state_dict() (loaded with torch.load(weights_only=True): a checkpoint that needs
    pickle code to load is refused). Prints a ranked summary, each finding with its remedy
    on the line below (--brief: without); exit code 0 when analysed,
    1 when a finding reaches --fail-on, 2 on bad input, 3 on an unexpected internal error.
    """
    thresholds = _thresholds(config)
    run = _load(path)
    with _damaged_as_bad_input():
        _report(run, thresholds, pdf, json_out, fail_on, brief)


def _summary(run_summary: dict, findings: list, brief: bool, err: bool = False) -> None:
    """analyze's lines: on a terminal coloured and wrapped to its width, else one per line."""
    from gradprobe.report import summary_lines

    stream = sys.stderr if err else sys.stdout
    for line in summary_lines(run_summary, findings, color=stream.isatty(), remedies=not brief,
                              width=_columns(stream)):
        click.echo(line, err=err)


def _columns(stream) -> int | None:
    """The width to wrap ``stream``'s lines to: on a terminal COLUMNS where set, else the
    terminal's own width (80 where it reports none); None for a pipe or a file, where each
    finding stays one greppable line (COLUMNS is no sign of a terminal there: GNU readline
    exports it in any process that loads it, and every child inherits it)."""
    if not stream.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except OSError:
        return 80


def _report(run, thresholds, pdf: str | None, json_out: str | None, fail_on: str | None,
            brief: bool) -> None:
    from gradprobe.report import findings_json

    findings = _diagnose_with_progress(run, thresholds)
    summary = run.summary()
    to_stdout = json_out == "-"
    echo = (lambda line: click.echo(line, err=True)) if to_stdout else click.echo
    _summary(summary, findings, brief, err=to_stdout)
    if json_out:
        text = findings_json(summary, findings)
        if to_stdout:
            click.echo(text)
        else:
            Path(json_out).write_text(text + "\n")
            echo(f"findings written to {json_out}")
    if pdf:
        from gradprobe.report import write_pdf

        written = write_pdf(run, findings, pdf)
        echo(f"report written to {written}")
    _exit_on(findings, fail_on)


def _exit_on(findings: list, fail_on: str | None) -> None:
    """Exit code 1 when a finding reaches ``--fail-on``."""
    from gradprobe.diagnose import SEVERITY_ORDER

    if fail_on is not None and any(SEVERITY_ORDER[f.severity] <= SEVERITY_ORDER[fail_on]
                                   for f in findings):
        sys.exit(1)


@main.command()
@click.argument("path", type=click.Path(dir_okay=True, path_type=str))
@click.option("--every", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between looks at the run file.")
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Seconds to wait for the run file to appear.")
@click.option("--fail-on", type=click.Choice(["warning", "error"]), default=None,
              help="Exit with code 1 when a finding of this severity or worse is present at the end.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=str),
              help="TOML file overriding diagnosis thresholds (see docs/findings.md).")
@click.option("--plain", is_flag=True,
              help="One line per change (for CI logs) instead of a view redrawn in place; "
                   "the default when standard output is not a terminal.")
@click.option("--brief", is_flag=True, help="The final summary without remedy lines.")
def watch(path: str, every: float, timeout: float, fail_on: str | None,
          config: str | None, plain: bool, brief: bool) -> None:
    """Follow a run while it trains: progress, key numbers, findings as they appear.

    PATH is the run file (.gprobe) a Probe is writing (or will write: watch waits up to
    --timeout seconds for it). On a terminal the view refreshes in place, laid out for the
    terminal's size; with --plain, or off a terminal, it prints one line per change (a
    finding appearing, changing severity or clearing; progress every 30 s). When the run is
    closed, its writer is gone (a stale lock: the training process died), or on Ctrl-C,
    watch prints the final summary as analyze does. Exit codes as analyze: 0, 1 (--fail-on),
    2 bad input, 3 internal error. docs/live.md.
    """
    from gradprobe.record import RunFileError
    from gradprobe.report.live import watch as follow

    thresholds = _thresholds(config)
    try:
        result = follow(path, every=every, timeout=timeout, thresholds=thresholds,
                        plain=True if plain else None)
    except RunFileError as exc:
        raise BadInput(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("gradprobe: interrupted before the run file appeared", err=True)
        sys.exit(130)
    reading = result.reading
    if result.ending == "gone":
        click.echo(f"the writer of {path} is gone without closing the run (stale lock "
                   f"{path}.lock: the training process was killed or crashed); these are the "
                   "findings of the steps it committed")
    _summary(reading.summary, reading.findings, brief)
    _exit_on(reading.findings, fail_on)


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="CSV file to write (long form: step, quantity, name, value).")
def export(path: str, output: str) -> None:
    """Write every recorded scalar of a run as a long-form CSV (for pandas or a spreadsheet)."""
    run = _load(path)
    with _damaged_as_bad_input():
        rows = run.to_csv(output)
    click.echo(f"{rows} rows written to {output}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "pdf", type=click.Path(dir_okay=False, path_type=str),
              help="Write a PDF with the findings side by side and the key series overlaid.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=str),
              help="TOML file overriding diagnosis thresholds.")
def compare(paths: tuple[str, ...], pdf: str | None, config: str | None) -> None:
    """Compare the findings of several runs (e.g. before and after a fix).

    Prints one row per finding id and one column per run, each finding's key number as
    analyze prints it, and what each run cleared, kept and added against the first; with -o,
    also a PDF overlaying the key series (gradient ratios, losses and logged metrics, latent
    ranks, saturation) of all runs.
    """
    from gradprobe.diagnose import diagnose
    from gradprobe.report import comparison_lines
    from gradprobe.report.comparison import key_number_lines

    thresholds = _thresholds(config)
    runs = [_load(p) for p in paths]
    findings_per_run = [diagnose(run, thresholds) for run in runs]
    labels = [run.name for run in runs]
    for line in comparison_lines(labels, findings_per_run) + key_number_lines(labels,
                                                                              findings_per_run):
        click.echo(line)
    if pdf:
        from gradprobe.report import write_comparison_pdf

        click.echo(f"comparison written to {write_comparison_pdf(runs, findings_per_run, pdf)}")


@main.command()
@click.option("--out", "out_dir", default="gradprobe-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=str), help="Folder for runs and reports.")
@click.option("--steps", type=click.IntRange(min=20), default=None,
              help="Training steps per variant (default: the demo's built-in length).")
@click.option("--failing", "variant", flag_value="failing", help="Only the failing model.")
@click.option("--fixed", "variant", flag_value="fixed", help="Only the fixed model.")
@click.option("--both", "variant", flag_value="both", default=True,
              help="Both, then compare them (the default).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out_dir: str, steps: int | None, variant: str, seed: int) -> None:
    """Reproduce the record-22 failure and its fix, and show what gradprobe finds.

    Trains the dual-stream decoupling model of record 22 on synthetic sequences (failing:
    fixed small loss weights, single-cell-line batches, strict orthogonality, fixed T = 1;
    fixed: the record's remedies), with the probe attached; writes DIR/<variant>.gprobe,
    DIR/<variant>.ckpt and DIR/<variant>.pdf, prints the findings and held-out accuracy.
    """
    from gradprobe import demo as decoupling
    from gradprobe.demo.progress import training_progress
    from gradprobe.diagnose import diagnose
    from gradprobe.report import comparison_lines, summary_lines, write_comparison_pdf, write_pdf

    variants = ["failing", "fixed"] if variant == "both" else [variant]
    steps = steps or decoupling.DEFAULT_STEPS
    runs, findings_per_run = [], []
    for name in variants:
        with training_progress(f"training {name}", steps, sys.stderr) as advance:
            result = decoupling.train(name, steps=steps, seed=seed, out_dir=out_dir,
                                      progress=advance)
        run = _load(result["run_path"])
        findings = diagnose(run)
        report = write_pdf(run, findings, Path(out_dir) / f"{name}.pdf", title=f"record-22 demo: {name}")
        runs.append(run)
        findings_per_run.append(findings)
        click.echo("")
        for line in summary_lines(run.summary(), findings, color=sys.stdout.isatty()):
            click.echo(line)
        click.echo(f"held-out cell-line accuracy {result['heldout_accuracy']:.3f} "
                   f"(Bayes-optimal {result['bayes_accuracy']:.3f}); report: {report}")
    if len(runs) > 1:
        click.echo("")
        for line in comparison_lines(variants, findings_per_run):
            click.echo(line)
        path = write_comparison_pdf(runs, findings_per_run, Path(out_dir) / "compare.pdf")
        click.echo(f"comparison written to {path}")


if __name__ == "__main__":
    main()
