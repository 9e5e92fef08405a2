"""The per-loss Gram matrix from layer inputs and output gradients equals autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.probe.layer_gram import LayerGram


class Trunk(nn.Module):
    """Every supported layer kind, with the options that change the unfolding."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 5, 4, stride=2, padding=3, dilation=2)
        self.conv1b = nn.Conv1d(5, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.conv2 = nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0))
        self.token = nn.Linear(6, 7)  # applied to every position: rows = batch x positions
        self.out = nn.Linear(7, 4, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.relu(self.conv1b(h))
        h = self.conv2(h.unsqueeze(2).expand(-1, -1, 3, -1))
        h = self.token(h.permute(0, 2, 3, 1))
        return self.out(torch.tanh(h).mean(dim=(1, 2)))


def losses_of(trunk, x):
    z = trunk(x)
    shared = trunk.token(torch.zeros(1, 6, dtype=x.dtype)).sum()  # a second call of one layer
    return [z[:, 0].pow(2).mean() + shared, (z[:, 1] - z[:, 2]).abs().mean(),
            F.softplus(z).sum(), z.new_zeros((), requires_grad=False) + 1.0]


def autograd_gram(losses, params):
    rows = []
    for loss in losses:
        if not loss.requires_grad:
            rows.append(torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params)]).double())
    j = torch.stack(rows)
    return j @ j.T


@pytest.mark.parametrize("strategy", ["auto", "inputs", "gradients"])
def test_layer_gram_equals_autograd(strategy):
    torch.manual_seed(0)
    trunk = Trunk().double()
    gram = LayerGram.of(trunk, strategy=strategy)
    x = torch.randn(5, 3, 20, dtype=torch.float64)
    with gram.capture():
        losses = losses_of(trunk, x)
    got = gram.gram(losses)
    expected = autograd_gram(losses, gram.parameters())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[3].abs().max() == 0  # the constant loss has no gradient
    sum(losses).backward()  # the graph was kept for the ordinary backward
    assert all(p.grad is not None for p in gram.parameters())


def test_float32_layers_give_the_gram_of_autograds_float32_gradients():
    torch.manual_seed(1)
    trunk = Trunk()
    gram = LayerGram.of(trunk)
    with gram.capture():
        losses = losses_of(trunk, torch.randn(6, 3, 24))
    expected = autograd_gram(losses, gram.parameters())  # float32 gradients, float64 Gram
    got = gram.gram(losses)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-9)


def test_both_routes_are_taken_where_each_is_cheaper():
    wide = nn.Linear(512, 512).double()   # 8 rows: the 8 x 8 route
    conv = nn.Conv1d(2, 3, 3).double()    # 8 x 98 rows of width 6: per-loss gradients
    gram = LayerGram([wide, conv])
    x = torch.randn(8, 512, dtype=torch.float64)
    s = torch.randn(8, 2, 100, dtype=torch.float64)
    with gram.capture():
        a, b = wide(x), conv(s)
    losses = [a.pow(2).sum() + b.sum(), a.sum() - b.pow(3).mean()]
    expected = autograd_gram(losses, gram.parameters())
    torch.testing.assert_close(gram.gram(losses), expected, rtol=1e-10, atol=1e-12)


def test_unsupported_layers_and_in_place_outputs_are_refused():
    with pytest.raises(ValueError, match="other layers: 1.weight, 1.bias"):
        LayerGram.of(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="groups=1"):
        LayerGram([nn.Conv1d(4, 4, 3, groups=2)])
    layer = nn.Linear(3, 3)
    gram = LayerGram([layer])
    with gram.capture():
        out = torch.relu_(layer(torch.randn(4, 3)))
    with pytest.raises(ValueError, match="modified in place"):
        gram.gram([out.sum()])
