"""Bad input to the API: one clear message at the first step, and docs/errors.md says which.

Every case runs for real and its message is checked against the table in docs/errors.md,
so the table cannot drift from what users see.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import gradprobe
from gradprobe import GradprobeWarning, ProbeUsageError

from models import TwoLatentNet, four_losses, make_data

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def _setup():
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data(n=16)
    return model, x, y, g


def _first_step(probe_kwargs=None, watch=None, observe=None, edit_losses=None, weights=None):
    """Run one training step; return ('raises', message) or ('warns', message)."""
    model, x, y, g = _setup()
    probe = gradprobe.Probe(model, every=1, **(probe_kwargs or {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if watch:  # before the forward pass, so that watched modules' hooks run
                watch(probe, model)
            losses, _ = four_losses(model, x, y, g)
            if edit_losses:
                losses = edit_losses(losses)
            if observe:
                probe.observe(**observe)
            probe.backward(losses, weights=weights)
        except ProbeUsageError as exc:
            return "raises", str(exc)
    messages = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(messages) == 1, messages
    return "warns", messages[0]


def _constructor(**kwargs):
    try:
        gradprobe.Probe(TwoLatentNet(), **kwargs)
    except ProbeUsageError as exc:
        return "raises", str(exc)
    raise AssertionError("no error")


def _watch_twice(probe, model):
    probe.watch_latent("z")
    probe.watch_latent("z")


CASES = {
    "a latent of shape [B]": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z"), observe={"z": torch.randn(16)}),
    "an empty latent batch": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z"), observe={"z": torch.randn(0, 8)}),
    "an integer latent": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z"), observe={"z": torch.ones(16, 8, dtype=torch.long)}),
    "a module that returns a tuple": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z", m)),
    "a latent that is a dict": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z"), observe={"z": {"rep": torch.randn(16, 8)}}),
    "a latent that is None": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z"), observe={"z": None}),
    "a select that picks nothing": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z", m, select=5)),
    "a select that is not an index, key or function": lambda: _first_step(
        watch=lambda p, m: p.watch_latent("z", m, select=1.5)),
    "a loss of shape [B]": lambda: _first_step(
        edit_losses=lambda L: {**L, "task": torch.ones(16, requires_grad=True)}),
    "an integer loss": lambda: _first_step(
        edit_losses=lambda L: {**L, "task": torch.tensor(1)}),
    "a loss on another device": lambda: _first_step(
        edit_losses=lambda L: {**L, "orth": torch.empty((), device="meta")}),
    "a loss that is not a tensor": lambda: _first_step(
        edit_losses=lambda L: {**L, "task": 0.5}),
    "no losses": lambda: _first_step(edit_losses=lambda L: {}),
    "weights for unknown losses": lambda: _first_step(weights={"typo": 0.1}),
    "a weight that is not a number": lambda: _first_step(weights={"cont": "0.1"}),
    "a weight tensor with several values": lambda: _first_step(weights={"cont": torch.ones(2)}),
    "a duplicated watch name": lambda: _first_step(watch=_watch_twice),
    "a name observe() does not expect": lambda: _first_step(observe={"zz": torch.ones(2, 2)}),
    "a saturation target that is itself watched": lambda: _first_step(
        watch=lambda p, m: (p.watch_latent("z"), p.watch_saturation("s", target="z"))),
    "latent labels that are themselves watched": lambda: _first_step(
        watch=lambda p, m: (p.watch_saturation("s"), p.watch_latent("z", labels="s"))),
    "a task name that is not a loss": lambda: _first_step(probe_kwargs={"task": "main"}),
    "both run_file= and log=": lambda: _constructor(run_file="a.gprobe", log="b.gprobe"),
    "every=0": lambda: _constructor(every=0),
    "an unknown role": lambda: _constructor(roles={"cont": "contrastiv"}),
    "shared that is not a module or parameters": lambda: _constructor(shared=3),
}


def _documented() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| (.+?) \| (raises|warns) \| `(.+)` \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_the_documented_message(case):
    how, message = CASES[case]()
    assert "\n" not in message
    documented = _documented()
    assert case in documented, f"docs/errors.md lacks a row for {case!r}"
    assert documented[case] == (how, message)


def test_every_documented_case_is_tried():
    assert set(_documented()) == set(CASES)


def test_log_is_the_former_name_of_run_file(tmp_path):
    model, x, y, g = _setup()
    path = tmp_path / "old.gprobe"
    with pytest.warns(FutureWarning, match=r"Probe\(log=\.\.\.\) is renamed Probe\(run_file"):
        probe = gradprobe.Probe(model, every=1, log=path)
    losses, _ = four_losses(model, x, y, g)
    probe.backward(losses)
    probe.close()
    assert probe.run_name == "old"
    assert gradprobe.load_run(path).probe_steps().tolist() == [0]
