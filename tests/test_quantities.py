"""The registry of recorded quantities (gradprobe.record.quantities) against what a real probe
run writes and what docs/quantities.md says."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.record import QUANTITIES, ROLES, Quantity, pair_name, pair_parts
from gradprobe.record import quantities as q

DOC = Path(__file__).resolve().parents[1] / "docs" / "quantities.md"


@pytest.fixture(scope="module")
def everything_run(tmp_path_factory):
    """A small multi-loss model with every kind of watch, under a CPU GradScaler: three losses,
    two latents (one with class labels), prototypes fed by a latent and groups, a sigmoid with
    a temperature, energy terms and targets, an InfoNCE batch, and a logged scalar."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quantities") / "everything.gprobe"
    trunk, head, proj = nn.Linear(6, 8), nn.Linear(8, 1), nn.Linear(8, 4)
    model = nn.ModuleDict({"trunk": trunk, "head": head, "proj": proj})
    protos = torch.randn(3, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    probe = gradprobe.Probe(model, shared=trunk, every=1, run_file=path, task="task",
                            roles={"cont": "contrastive", "proto": "prototype"})
    probe.watch_latent("z", labels="y")
    probe.watch_latent("p")
    probe.watch_prototypes("centres", lambda: protos, latent="z")
    probe.watch_saturation("out", temperature=0.5, terms=("u", "r"), target="y01")
    probe.watch_contrastive("pairs", temperature=0.1)
    for step in range(6):
        x = torch.randn(12, 6)
        y = torch.arange(12) % 3
        z = torch.relu(trunk(x))
        p = proj(z)
        logit = head(z).squeeze(1) / 0.5
        u, r = z[:, 0], 10 * z[:, 1]
        probe.observe(z=z, p=p, y=y, groups=y, out=logit, u=u, r=r, y01=(y == 0).float(),
                      pairs=(p, p + 0.1 * torch.randn_like(p)))
        losses = {"task": (logit - (y == 0).float()).pow(2).mean(),
                  "cont": -torch.nn.functional.cosine_similarity(p, p.roll(1, 0)).mean(),
                  "proto": (z - protos[y]).pow(2).mean()}
        opt.zero_grad()
        probe.backward(losses, weights={"task": 1.0, "cont": 0.1, "proto": 0.2}, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        protos.mul_(0.9).add_(0.1 * torch.randn(3, 8))
        probe.log(val_loss=1.0 / (step + 1))
    probe.close()
    return path


def test_every_quantity_a_real_run_writes_is_in_the_registry(everything_run):
    run = gradprobe.load_run(everything_run)
    written = set(run.quantities())
    with sqlite3.connect(everything_run) as conn:
        arrays = {row[0] for row in conn.execute("SELECT DISTINCT quantity FROM arrays")}
    assert written - set(QUANTITIES) == set()
    assert arrays - set(QUANTITIES) == set()
    assert {n for n in written | arrays if QUANTITIES[n].kind == "array"} == arrays
    # ...and the run exercised the whole registry: no name in it is stale.
    assert set(QUANTITIES) - written - arrays == set()


def test_series_names_follow_the_registry_subjects(everything_run):
    run = gradprobe.load_run(everything_run)
    losses = set(run.losses)
    for quantity in run.quantities():
        subject = QUANTITIES[quantity].subject
        for name in run.names(quantity):
            if subject == "loss":
                assert name in losses, (quantity, name)
            elif subject == "pair a|b":
                assert set(pair_parts(name)) <= losses and pair_name(*pair_parts(name)) == name
            elif subject in (q.SHARED, q.BATCH, q.AMP):
                assert name == subject, (quantity, name)
    assert run.names(q.LATENT_GRAD_NORM) == sorted(pair_name(z, n) for z in ("p", "z")
                                                   for n in ("cont", "proto", "task"))


def test_registry_entries_are_well_formed():
    constants = {v for k, v in vars(q).items() if k.isupper() and isinstance(v, str)
                 and v in QUANTITIES}
    assert constants == set(QUANTITIES)  # one constant per quantity, none without an entry
    for name, entry in QUANTITIES.items():
        assert isinstance(entry, Quantity) and entry.name == name
        assert entry.meaning and entry.label and entry.unit
        assert entry.reference is None or QUANTITIES[entry.reference].subject == entry.subject
    assert q.SATURATION_THRESHOLD_USED == "saturation_threshold"
    assert gradprobe.metrics.SATURATION_THRESHOLD == 4.6  # the cut-off value, a different name
    with pytest.raises(ValueError, match="unknown direction"):
        Quantity("x", "losses", "loss", "u", "x", "up", "m")
    assert "kl" in ROLES and ROLES[-1] == "other"
    assert gradprobe.probe.ROLES is ROLES and gradprobe.diagnose.thresholds.ROLES is ROLES


def markdown_table(group: str) -> str:
    """The table docs/quantities.md shows for one group of the registry."""
    def cell(text: str | None) -> str:
        return "—" if text is None else text.replace("|", "\\|")

    rows = ["| quantity | name | unit | better | healthy | meaning |",
            "|---|---|---|---|---|---|"]
    for entry in QUANTITIES.values():
        if entry.group != group:
            continue
        healthy = [entry.healthy] if entry.healthy else []
        if entry.reference is not None:
            healthy.append(f"recorded as `{entry.reference}`")
        rows.append(f"| `{entry.name}`{' (array)' if entry.kind == 'array' else ''} | "
                    f"{cell(entry.subject)} | {cell(entry.unit)} | "
                    f"{'—' if entry.direction == 'neither' else entry.direction} | "
                    f"{cell('; '.join(healthy)) if healthy else '—'} | "
                    f"{cell(entry.meaning)} |")
    return "\n".join(rows) + "\n"


def test_docs_show_the_registry():
    text = DOC.read_text()
    for group in q.GROUPS:
        table = markdown_table(group)
        assert table in text, f"docs/quantities.md lacks (or changed) the table:\n{table}"


def test_the_docs_example_prints_what_it_says(capsys):
    block = DOC.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, str(DOC), "exec"), {})
    said = block.strip().splitlines()[-1].lstrip("# ")
    assert capsys.readouterr().out.strip() == said


if __name__ == "__main__":  # print the tables, to paste into docs/quantities.md
    for group in q.GROUPS:
        print(f"## {group}\n\n{markdown_table(group)}")
