"""A swamped term computed on another loss's forward pass, with no parameters of its own
(docs/findings.md, "gradient-swamping"): the graph cannot say whether it is a regulariser,
whose small share is the design, or an objective held back, so it is ``info`` with the two
declarations that settle it, unless what it reaches fails by its own measure. The same term
on a forward pass of its own, or declared, stays an alarm. Real training runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.diagnose import diagnose
from gradprobe.probe.roles import read_reach

STEPS = 240


def _train(tmp_path, *, own_pass: bool, roles=None, weight=1e-4):
    """A regression task on one batch and a squared-output term at ``weight``: on the task's
    outputs (``own_pass=False``, a regulariser's wiring) or on the network run on a batch of
    its own (a boundary loss's wiring). The term's target (outputs at 3) keeps it far from
    its floor, so a small weight leaves it swamped."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(128, 4)
    y = x[:, :1] * 2 + x[:, 1:2].sin()
    edge = torch.randn(32, 4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    path = tmp_path / f"term-{own_pass}-{bool(roles)}.gprobe"
    probe = gradprobe.Probe(net, run_file=path, every=2, roles=roles)
    for _ in range(STEPS):
        opt.zero_grad()
        out = net(x)
        term_out = net(edge) if own_pass else out
        losses = {"fit": (out - y).pow(2).mean(), "term": (term_out - 3).pow(2).mean()}
        probe.backward(losses, weights={"fit": 1.0, "term": weight})
        opt.step()
    probe.close()
    return gradprobe.load_run(path)


def _swamping(run):
    return next(f for f in diagnose(run) if f.id == "gradient-swamping" and f.subject == "term")


def test_the_graph_tells_a_forward_pass_of_its_own_from_another_loss_s():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    head = nn.Linear(2, 1)
    x, edge = torch.randn(5, 3), torch.randn(4, 3)
    features = net(x)
    task = (head(features) - 1).pow(2).mean()
    on_features = features.pow(2).mean()
    on_edge = net(edge).pow(2).mean()
    ids = {id(p) for p in [*net.parameters(), *head.parameters()]}
    reach = read_reach([task, on_features, on_edge], [1.0, 1.0, 1.0], ids)
    # Autograd agrees on what each reaches: the three reach the 4 tensors of net.
    for loss, r in zip((on_features, on_edge), reach[1:]):
        grads = torch.autograd.grad(loss, [*net.parameters(), *head.parameters()],
                                    retain_graph=True, allow_unused=True)
        assert r["shared"] + r["own"] == sum(g is not None for g in grads) == 4
    assert [r["own_pass"] for r in reach] == [False, False, True]
    assert [r["own"] for r in reach] == [2, 0, 0]


def test_a_swamped_term_on_the_task_s_pass_is_info_with_the_declarations(tmp_path):
    run = _train(tmp_path, own_pass=False)
    record = next(r for r in run.meta["role_records"] if r["name"] == "term")
    assert record["own_pass"] is False and record["counts"]["own"] == 0
    finding = _swamping(run)
    ratio = finding.evidence["median_ratio"]
    assert ratio < 0.05  # swamped by the measure every loss is judged by
    assert finding.severity == "info"
    assert finding.evidence["serves_another_pass"] and finding.evidence["reach_failing"] == []
    assert 'roles={"term": "regularization"}' in finding.remedy
    assert 'roles={"term": "task"}' in finding.remedy
    assert not any(f.id == "static-loss-weights" and f.severity != "info" for f in diagnose(run))


@pytest.mark.parametrize("own_pass,roles", [(True, None), (False, {"term": "task"})])
def test_the_same_term_on_its_own_pass_or_declared_stays_an_alarm(tmp_path, own_pass, roles):
    run = _train(tmp_path, own_pass=own_pass, roles=roles)
    finding = _swamping(run)
    assert finding.evidence["median_ratio"] < 0.05
    assert finding.severity in ("warning", "error")
    assert finding.evidence["serves_another_pass"] is False


def _latent_run(tmp_path, collapse: bool):
    """A regression whose watched latent z feeds the head through a map that projects it onto
    one direction over training (``collapse``: the rank-1 collapse of tests/runs.py
    shrinking_latent) or leaves it alone, and a term on z at weight 1e-4, far from its floor."""
    torch.manual_seed(0)
    x = torch.randn(512, 12)
    y = torch.tanh(x[:, :4]).sum(1, keepdim=True)
    enc = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 8))
    head = nn.Linear(8, 1)
    model = nn.ModuleList([enc, head])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    u = nn.functional.normalize(torch.randn(8), dim=0)
    path = tmp_path / f"latent-{collapse}.gprobe"
    probe = gradprobe.Probe(model, run_file=path, every=2)
    probe.watch_latent("z")
    for step in range(STEPS):
        t = min(1.0, step / (0.7 * STEPS)) if collapse else 0.0
        idx = torch.randint(0, 512, (64,))
        z = enc(x[idx])
        z = (1 - t) * z + t * (z @ u)[:, None] * u[None, :]
        probe.observe(z=z)
        losses = {"fit": (head(z) - y[idx]).pow(2).mean(), "term": (z - 3).pow(2).mean()}
        probe.backward(losses, weights={"fit": 1.0, "term": 1e-4})
        opt.step()
        opt.zero_grad()
    probe.close()
    return gradprobe.load_run(path)


@pytest.mark.parametrize("collapse", [True, False])
def test_a_serving_term_whose_latent_collapses_stays_an_alarm(tmp_path, collapse):
    run = _latent_run(tmp_path, collapse)
    findings = diagnose(run)
    collapsed = [f for f in findings if f.id == "representation-collapse" and f.subject == "z"
                 and f.severity != "info"]
    assert bool(collapsed) == collapse
    _, reach = run.series("latent_grad_norm", "z|term")
    assert (reach > 0).all()  # the term's gradient reaches z: autograd, as recorded
    finding = _swamping(run)
    assert finding.evidence["serves_another_pass"]
    assert finding.evidence["reach_failing"] == (["z"] if collapse else [])
    assert (finding.severity != "info") == collapse


class _TopOneMoE(nn.Module):
    """docs/probe.md's top-1 cosine router with the Switch balancing loss, on encoded tokens."""

    def __init__(self, dim=8, experts=4, scale=5.0):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))
        self.scale = scale

    def keys(self):
        return nn.functional.normalize(self.router.weight, dim=1)

    def forward(self, tokens):
        gates = (self.scale * tokens @ self.keys().T).softmax(-1)
        top = gates.argmax(-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows = top == e
            out[rows] = gates[rows, e:e + 1] * expert(tokens[rows])
        share = torch.bincount(top, minlength=len(self.experts)).float() / len(top)
        return out, len(self.experts) * (share * gates.mean(0)).sum()


def _router_run(tmp_path, observe_used: bool):
    """The balancing loss at 1e-4: the router collapses to one expert (docs/probe.md: at weight
    0 it does). The table is a callable (no graph leaf); the latent it assigns is the encoded
    tokens the router reads (``observe_used``) or a copy of them no loss uses."""
    torch.manual_seed(0)
    enc, moe, head = nn.Linear(8, 8), _TopOneMoE(), nn.Linear(8, 1)
    model = nn.ModuleDict({"enc": enc, "moe": moe, "head": head})
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    path = tmp_path / f"router-{observe_used}.gprobe"
    probe = gradprobe.Probe(model, every=5, run_file=path)
    probe.watch_latent("tokens")
    probe.watch_prototypes("experts", moe.keys, latent="tokens")
    a = torch.randn(8)
    for _ in range(STEPS):
        kinds = torch.randint(0, 4, (64,))
        x = 1.0 + 0.3 * nn.functional.one_hot(kinds, 8) + torch.randn(64, 8)
        tokens = nn.functional.normalize(enc(x), dim=1)
        out, balance = moe(tokens)
        probe.observe(tokens=tokens if observe_used else tokens.detach().clone().requires_grad_(),
                      groups=kinds)
        task = nn.functional.mse_loss(head(out), 3 * (x @ a)[:, None]) / 9
        probe.backward({"task": task, "balance": balance}, weights={"balance": 1e-4})
        opt.step()
        opt.zero_grad()
    probe.close()
    return gradprobe.load_run(path)


@pytest.mark.parametrize("observe_used", [True, False])
def test_a_starved_balancing_loss_is_linked_to_its_collapsed_router_through_the_latent(
        tmp_path, observe_used):
    run = _router_run(tmp_path, observe_used)
    findings = diagnose(run)
    assert any(f.id == "prototype-collapse" and f.subject == "experts" and f.severity != "info"
               for f in findings)
    record = next(r for r in run.meta["role_records"] if r["name"] == "balance")
    assert record["prototypes_reached"] == []  # a callable table is no leaf of the graph
    assert run.meta["prototypes"] == {"experts": "tokens"}
    _, reach = run.series("latent_grad_norm", "tokens|balance")
    assert bool((reach > 0).any()) == observe_used
    finding = next(f for f in findings if f.id == "gradient-swamping" and f.subject == "balance")
    assert finding.evidence["serves_another_pass"]
    # Linked only where the loss's gradient reaches the latent the table assigns (the limit
    # docs/findings.md states: declare the balancing loss's role otherwise).
    assert finding.evidence["reach_failing"] == (["experts"] if observe_used else [])
    assert (finding.severity != "info") == observe_used
