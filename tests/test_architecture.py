"""The shape of the package (docs/architecture.md): data flows one way through the stages, no
module imports a later stage or sits in an import circle, no module is over 500 lines, and
``import gradprobe`` (a training job) leaves the report's plotting libraries unimported."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gradprobe

PACKAGE = Path(gradprobe.__file__).parent

# Import order: a module may import its own stage and the stages before it. The base is the
# root's leaf modules that import nothing of gradprobe (the version, the warning category), so
# every stage reads them without running another. The record comes before the probe because
# the probe writes through the record's writer (the data still flows probe -> run file ->
# diagnose). The root package is the top-level API, above everything.
STAGES = ("base", "metrics", "record", "probe", "diagnose", "report", "top", "api")
BASE = {"_lazy", "_version", "_warnings"}
TOP = {"cli", "demo", "remedies", "integrations", "opcount"}
# Later stages a module may import inside a function (never at module level), each for a
# documented reason: probe.findings() and on_finding diagnose the run in the training process
# (docs/live.md), and the probe is imported by every training job, so the import is lazy.
LAZY_LATER_STAGE = {("gradprobe.probe.live", "gradprobe.diagnose")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return "base" if parts[1] in BASE else "top" if parts[1] in TOP else parts[1]


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, set[str], int]]:
    """``(imported module, names taken from it, line)`` for every import of a package module
    in ``path``, at any depth (a function's lazy import included)."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, set(), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.append((sub, set(), node.lineno))
                else:
                    out.append((target, {alias.name}, node.lineno))
    root = module.split(".")[0]
    return [(t, names, line) for t, names, line in out if t.split(".")[0] == root]


def lazy_import_lines(path: Path) -> set[int]:
    """The lines of the imports made inside a function of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    return {node.lineno for func in ast.walk(tree)
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))}


def check_package(root: Path) -> list[str]:
    """Every violation of the layering in the package at ``root``: an import of a later stage,
    or an import circle between modules."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(paths)
    problems = []
    edges: dict[str, set[str]] = {m: set() for m in paths}
    for module, path in paths.items():
        for target, names, line in imports_of(path, module, known):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            # A module's enclosing packages are initialised (or initialising) before it runs.
            if module == target or module.startswith(target + "."):
                if target.count(".") == 0 and stage_of(module) not in ("top", "api") and names:
                    problems.append(f"{module}:{line} imports {sorted(names)} from the top-level "
                                    f"API {target}")
                continue
            if STAGES.index(stage_of(target)) > STAGES.index(stage_of(module)) and not (
                    (module, target) in LAZY_LATER_STAGE and line in lazy_import_lines(path)):
                problems.append(f"{module}:{line} ({stage_of(module)}) imports {target} "
                                f"({stage_of(target)}), a later stage")
            # Importing a.b.c runs a.b first, unless the importer is inside a.b.
            parts = target.split(".")
            for k in range(2, len(parts) + 1):
                enclosing = ".".join(parts[:k])
                if enclosing in known and enclosing != module and \
                        not module.startswith(enclosing + "."):
                    edges[module].add(enclosing)
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(edges)]
    return problems


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of two or more modules (or a self-import)."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_no_stage_imports_a_later_one_and_no_import_circle():
    assert check_package(PACKAGE) == []


def test_the_layering_check_finds_a_later_stage_and_a_circle(tmp_path):
    """The checker itself, on a small package that breaks both rules (and one that does not)."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "from pkg._version import __version__\nfrom pkg import probe\n",
        "_version.py": "__version__ = '1'\n",
        "_warnings.py": "from pkg.record import Run\n",
        "metrics/__init__.py": "from pkg import __version__\n",
        "record/__init__.py": "from pkg._version import __version__\n",
        "probe/__init__.py": "from .hooks import attach\n",
        "probe/hooks.py": "from pkg.record import Run\n\ndef attach():\n"
                          "    from pkg.diagnose import rules\n",
        "diagnose/__init__.py": "from .rules import RULES\n",
        "diagnose/rules.py": "from . import findings\nRULES = {}\n",
        "diagnose/findings.py": "from .rules import RULES\n",
        "report/__init__.py": "from pkg import Probe\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert check_package(pkg) == [
        "pkg._warnings:1 (base) imports pkg.record (record), a later stage",
        "pkg.metrics:1 imports ['__version__'] from the top-level API pkg",
        "pkg.probe.hooks:4 (probe) imports pkg.diagnose.rules (diagnose), a later stage",
        "pkg.report:1 imports ['Probe'] from the top-level API pkg",
        "import circle: pkg.diagnose.rules -> pkg.diagnose.findings -> pkg.diagnose.rules",
    ]


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_a_training_job_does_not_import_the_plotting_libraries(tmp_path):
    """A probe attached to a real training loop, in a fresh interpreter: the run is written and
    neither matplotlib nor seaborn was imported."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        from torch import nn
        import gradprobe

        torch.manual_seed(0)
        trunk, a, b = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 1)
        model = nn.ModuleDict({{"trunk": trunk, "a": a, "b": b}})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = gradprobe.Probe(model, shared=trunk, every=1, run_file={str(tmp_path / 'r.gprobe')!r})
        probe.watch_latent("z")
        for _ in range(4):
            x = torch.randn(16, 4)
            z = torch.relu(trunk(x))
            probe.observe(z=z)
            opt.zero_grad()
            probe.backward({{"a": a(z).pow(2).mean(), "b": (b(z) - 1).abs().mean()}})
            opt.step()
        probe.close()
        run = gradprobe.load_run({str(tmp_path / 'r.gprobe')!r})
        findings = gradprobe.diagnose(run)
        print(len(run.probe_steps()), sorted(m for m in ("matplotlib", "seaborn") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "4 []"


def test_the_top_level_api_is_the_documented_one(tmp_path, monkeypatch):
    """docs/architecture.md's example, as written, on the run file of examples/quickstart.py:
    ``diagnose`` is the package's ``diagnose.diagnose`` (the package keeps its names) and
    ``write_report`` writes the PDF report with the findings."""
    root = PACKAGE.parent
    made = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py"), "--out",
                           str(tmp_path / "run.gprobe"), "--steps", "40"], capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    block = (root / "docs" / "architecture.md").read_text().split("```python\n", 1)[1]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.split("```", 1)[0], "docs/architecture.md", "exec"), scope)

    from gradprobe.diagnose import Thresholds, diagnose
    run = scope["run"]
    assert scope["diagnose"] is gradprobe.diagnose and callable(gradprobe.diagnose)
    assert [f.to_dict() for f in scope["findings"]] == [f.to_dict() for f in diagnose(run)]
    assert [f.id for f in gradprobe.diagnose(run, Thresholds(min_points=10**6))] == \
        ["probe-incomplete"] * sum(f.id == "probe-incomplete" for f in scope["findings"])
    pypdf = pytest.importorskip("pypdf")
    text = "".join(page.extract_text() for page in pypdf.PdfReader("report.pdf").pages)
    assert run.name in text
    assert all(f.id in text for f in scope["findings"])
