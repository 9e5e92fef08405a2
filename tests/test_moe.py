"""A top-1 mixture-of-experts router watched as prototypes: docs/probe.md's example, run as
written (its router counting its own top-1 assignments on the side), against what it says."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import gradprobe

ROOT = Path(__file__).resolve().parents[1]


def documented_example() -> tuple[str, str, str]:
    """The MoE section's code (its definitions, its closing loop) and its printed output."""
    text = (ROOT / "docs" / "probe.md").read_text()
    section = text[text.index("### A mixture-of-experts router"):]
    code, output = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    definitions, loop = code.split("\nfor weight in")
    return definitions, "for weight in" + loop, output


def usage_entropy(top: torch.Tensor, experts: int) -> float:
    """The normalised entropy of the top-1 counts, computed here from the router's choices."""
    counts = torch.bincount(top, minlength=experts).double()
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * shares.log()).sum() / math.log(experts))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    definitions, loop, output = documented_example()
    namespace: dict = {}
    exec(compile(definitions, "docs/probe.md", "exec"), namespace)
    choices: list[float] = []
    documented = namespace["TopOneMoE"]

    class CountingMoE(documented):
        def forward(self, tokens):
            gates = (self.scale * torch.nn.functional.normalize(tokens, dim=1)
                     @ self.keys().T).softmax(-1)
            choices.append(usage_entropy(gates.argmax(-1), len(self.experts)))
            return super().forward(tokens)

    namespace["TopOneMoE"] = CountingMoE
    printed = io.StringIO()
    with contextlib.chdir(out), contextlib.redirect_stdout(printed):
        exec(compile(loop, "docs/probe.md", "exec"), namespace)
    steps = len(choices) // 2
    return out, printed.getvalue(), output, {0.0: choices[:steps], 1.0: choices[steps:]}


def test_the_documented_output_is_what_the_example_prints(example):
    _, printed, output, _ = example
    assert printed == output


def test_collapse_found_without_balancing_and_quiet_with_it(example):
    out, _, _, _ = example
    collapsed = gradprobe.diagnose(gradprobe.load_run(out / "moe_0.0.gprobe"))
    balanced = gradprobe.diagnose(gradprobe.load_run(out / "moe_1.0.gprobe"))
    collapse = [f for f in collapsed if f.id == "prototype-collapse"]
    assert len(collapse) == 1 and collapse[0].subject == "experts"
    assert collapse[0].evidence["pooled_usage"]["usage"] <= 0.05
    assert not [f for f in balanced if f.id.startswith("prototype")]


def test_recorded_usage_is_the_routers_own_top1_usage(example):
    out, _, _, router_usage = example
    for weight in (0.0, 1.0):
        run = gradprobe.load_run(out / f"moe_{weight}.gprobe")
        steps, usage = run.series("prototype_usage", "experts")
        assert len(steps) == 48
        np.testing.assert_allclose(usage, [router_usage[weight][s] for s in steps], atol=1e-12)
    # the collapse and the balance the docs describe, from the router's own choices
    assert np.median(router_usage[0.0][-100:]) == 0.0 and max(router_usage[0.0][-100:]) < 0.2
    assert min(router_usage[1.0][15:]) > 0.85
