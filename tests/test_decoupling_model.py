"""Tests for the record-22 reproduction (gradprobe.demo)."""

import numpy as np
import pytest
import torch

from gradprobe.demo import CellBatchSampler, make_data, train
from gradprobe.demo.data import scan_motifs
from gradprobe.demo.decoupling import (FAILING_WEIGHTS, REMEDIES, GradReverse, IntrinsicEncoder,
                                       build_model)


@pytest.fixture(scope="module")
def small():
    return make_data(seed=3, n_train_per_cell=300, n_val_per_cell=100, n_heldout_per_cell=300)


def test_generator_is_deterministic_per_seed():
    a, b, c = make_data(seed=7, n_train_per_cell=50), make_data(seed=7, n_train_per_cell=50), \
        make_data(seed=8, n_train_per_cell=50)
    for name in ("train", "val", "heldout"):
        sa, sb = getattr(a, name), getattr(b, name)
        for field in ("x", "y", "cell", "context", "prob"):
            assert torch.equal(getattr(sa, field), getattr(sb, field))
    assert not torch.equal(a.train.x, c.train.x)
    assert np.array_equal(a.weights, b.weights)


def test_generator_shape_and_splits(small):
    d = small
    assert d.train.x.shape[1:] == (4, 100)
    assert torch.all(d.train.x.sum(1) == 1)  # one-hot
    assert d.n_cells >= 8 and set(d.lineage.tolist()) == {0, 1}
    assert set(d.train.cell.tolist()) == set(d.train_cells) == set(d.val.cell.tolist())
    assert set(d.heldout.cell.tolist()) == set(d.heldout_cells)
    assert not set(d.train_cells) & set(d.heldout_cells)
    assert {int(d.lineage[c]) for c in d.heldout_cells} == {0, 1}  # one held-out line per lineage
    # the cell line scales the sequence effect (an interaction, not an offset): open epithelial
    # chromatin reads the motifs at several times the gain of closed fibroblast chromatin
    assert d.gain[d.lineage == 0].min() > 5 * d.gain[d.lineage == 1].max()
    assert np.allclose(d.weights, d.gain[:, None] * d.motif_weights[None, :])
    assert d.train.x.shape[2] == d.meta["insert_len"] + d.meta["tag_len"]


def test_bayes_accuracy_matches_direct_computation(small):
    d = small
    for split in (d.train, d.val, d.heldout):
        seqs = split.x.argmax(1).numpy()[:, :d.meta["insert_len"]]  # the insert decides the outcome
        motifs = scan_motifs(seqs, d.motif_seqs).astype(float)
        assert np.array_equal(motifs, split.motifs.numpy())
        c = split.cell.numpy()  # the documented formula, from the line's gain and baseline
        logit = d.gain[c] * ((motifs - d.meta["plant_p"]) @ d.motif_weights) + d.baseline[c]
        p = 1 / (1 + np.exp(-logit))
        assert np.allclose(p, split.prob.numpy(), atol=1e-6)
        direct = float(np.maximum(p, 1 - p).mean())
        assert split.bayes_accuracy == pytest.approx(direct, abs=1e-6)
        # the labels were really drawn from p: the Bayes rule's realised accuracy agrees
        n = len(split)
        assert abs(split.bayes_empirical - direct) < 4 * np.sqrt(0.25 / n) + 1e-3
    assert 0.6 < d.heldout.bayes_accuracy < 0.95


def test_generation_is_fast():
    import time
    t = time.perf_counter()
    make_data(seed=0)
    assert time.perf_counter() - t < 2.0


def test_cell_batch_sampler_single_cell_line(small):
    sampler = CellBatchSampler(small.train.cell, 32, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)  # no index twice in an epoch
    for b in batches:
        assert len(b) == 32
        assert len(torch.unique(small.train.cell[torch.from_numpy(b)])) == 1
    assert len({int(small.train.cell[b[0]]) for b in batches}) == len(small.train_cells)
    again = list(sampler)  # a new epoch, new order
    assert any(not np.array_equal(x, y) for x, y in zip(batches, again))


def test_model_forward_shapes(small):
    for variant in ("failing", "fixed"):
        m = build_model(small, variant)
        out = m(small.train.x[:5], small.train.context[:5])
        assert out.z_I.shape == (5, 16) and out.z_E.shape == (5, 16)
        assert out.u.shape == out.r.shape == out.energy.shape == out.logits.shape == (5,)
        assert m.prototypes.shape == (len(small.train_cells), 16)  # one per training line
        assert m.f_I(small.train.x[:5]).shape == (5, 16)  # the watched module returns the latent
    failing = build_model(small, "failing")
    assert failing.temperature is None and failing.lam is None and float(failing.T) == 1.0
    fixed = build_model(small, "fixed")
    assert fixed.temperature is not None and fixed.lam is not None
    assert build_model(small, "fixed", frozenset({"interaction"})).lam is None


def test_intrinsic_encoder_is_a_convolution():
    m = IntrinsicEncoder(8, channels=6, kernel=5)
    x = torch.randn(3, 4, 30)
    ref = m.proj(torch.relu(torch.nn.functional.conv1d(x, m.conv_weight, m.conv_bias)).amax(2))
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_gradient_reversal():
    x = torch.randn(4, 3, requires_grad=True)
    GradReverse.apply(x, 2.0).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -2.0))


def test_prototype_momentum_update(small):
    m = build_model(small, "failing")
    z = torch.ones(4, 16)
    cells = torch.tensor([1, 1, 1, 1])
    m.update_prototypes(z, cells)
    assert torch.allclose(m.prototypes[1], torch.ones(16))  # first sight: the mean
    m.update_prototypes(torch.zeros(4, 16), cells, momentum=0.9)
    assert torch.allclose(m.prototypes[1], torch.full((16,), 0.9))
    assert torch.all(m.prototypes[0] == 0)


@pytest.mark.parametrize("variant", ["failing", "fixed"])
def test_short_training_runs_and_learns(small, variant, tmp_path):
    r = train(variant, steps=100, seed=0, out_dir=tmp_path, probe_every=10, progress=False, data=small,
              val_every=20)
    before = r["history"][0]["val_task"]  # the same model after its first step
    assert (tmp_path / f"{variant}.ckpt").exists()
    ckpt = torch.load(tmp_path / f"{variant}.ckpt", weights_only=False)
    assert "model" in ckpt and "gradprobe" in ckpt
    hist = r["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 99
    assert r["val_loss"] < before
    assert r["train_loss"] < before  # full-split losses (a single batch loss is too noisy)
    assert 0.0 <= r["heldout_accuracy"] <= 1.0
    assert r["bayes_accuracy"] == pytest.approx(small.heldout.bayes_accuracy)
    if r["run_path"] is not None:
        assert (tmp_path / f"{variant}.gprobe").exists()
    if variant == "failing":
        assert r["final_weights"] == FAILING_WEIGHTS
        assert r["remedies"] == []
    else:
        assert set(r["remedies"]) == set(REMEDIES)


def test_ablation_flags_and_validation(small, tmp_path):
    r = train("fixed", steps=5, out_dir=tmp_path, progress=False, data=small, disable=frozenset({"balance", "l1"}))
    assert "balance" not in r["remedies"] and "l1" not in r["remedies"] and "memory" in r["remedies"]
    with pytest.raises(ValueError):
        train("fixed", steps=5, out_dir=tmp_path, progress=False, data=small, disable=frozenset({"nope"}))
    with pytest.raises(ValueError):
        train("other", steps=5, out_dir=tmp_path, progress=False, data=small)


def test_cell_lines_have_their_own_base_composition():
    d = make_data(seed=0, n_train_per_cell=400, n_val_per_cell=10, n_heldout_per_cell=10)
    comp = d.meta["composition"]
    assert comp.shape == (d.n_cells, 4) and np.allclose(comp.sum(1), 1)
    seqs = d.train.x.argmax(1).numpy()
    cells = d.train.cell.numpy()
    for c in d.train_cells:  # measured base frequencies follow the line's composition (motifs aside)
        freq = np.bincount(seqs[cells == c].ravel(), minlength=4) / seqs[cells == c].size
        assert np.abs(freq - comp[c]).max() < 0.05
    assert np.ptp(comp[:, 0]) > 0.1  # lines differ: sequences carry cell-line information
    flat = make_data(seed=0, n_train_per_cell=10, n_val_per_cell=10, n_heldout_per_cell=10,
                     composition_concentration=None)
    assert np.allclose(flat.meta["composition"], 0.25)
    assert len(make_data(seed=0).train) == 8 * 192  # small per-line training sets (default)


def test_same_group_partner_is_another_sample_of_the_line():
    from gradprobe.demo.decoupling import same_group_partner

    groups = torch.tensor([3, 3, 3, 1, 1, 7, 3])
    partner = same_group_partner(groups, torch.Generator().manual_seed(0))
    assert torch.equal(groups[partner], groups)
    assert partner[5] == 5  # alone in its group
    others = [i for i in range(7) if i != 5]
    assert all(int(partner[i]) != i for i in others)
    assert sorted(partner[groups == 3].tolist()) == [0, 1, 2, 6]  # a permutation within the group


def test_mixed_batches_hold_every_line_in_equal_shares(small):
    sampler = CellBatchSampler(small.train.cell, 64, seed=0, mixed=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 300 // 8  # the smallest line runs out after 37 batches of 8
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)
    for b in batches:
        counts = np.bincount(small.train.cell[torch.from_numpy(b)].numpy(), minlength=small.n_cells)
        assert sorted(set(counts[small.train_cells].tolist())) == [8] and counts.sum() == 64


def test_barcode_shortcut_predicts_the_label_in_training_lines_only():
    from scipy.stats import fisher_exact

    d = make_data(seed=1, n_train_per_cell=400, n_val_per_cell=10, n_heldout_per_cell=2000)
    p1, p0 = d.shortcut
    insert = d.meta["insert_len"]
    for split, biased in ((d.train, True), (d.heldout, False)):
        seqs = split.x.argmax(1).numpy()
        cells, y, tagged = split.cell.numpy(), split.y.numpy(), split.tagged.numpy()
        # the tag region is the sample's own line's barcode exactly when it is tagged
        carries = (seqs[:, insert:] == d.barcodes[cells]).all(1)
        assert np.array_equal(carries, tagged)
        rate1, rate0 = tagged[y == 1].mean(), tagged[y == 0].mean()
        table = [[int(tagged[y == 1].sum()), int((~tagged[y == 1]).sum())],
                 [int(tagged[y == 0].sum()), int((~tagged[y == 0]).sum())]]
        p_value = fisher_exact(table)[1]
        if biased:  # P(barcode | y) as documented, within 4 binomial standard errors
            for rate, q, n in ((rate1, p1, (y == 1).sum()), (rate0, p0, (y == 0).sum())):
                assert abs(rate - q) < 4 * np.sqrt(q * (1 - q) / n)
            assert p_value < 1e-100
        else:  # held-out lines: the barcode says nothing about y
            assert abs(rate1 - rate0) < 0.06 and p_value > 1e-3
            assert abs(tagged.mean() - (p1 + p0) / 2) < 0.03
    none = make_data(seed=1, n_train_per_cell=20, n_val_per_cell=10, n_heldout_per_cell=10, shortcut=None)
    assert not none.train.tagged.any() and not none.heldout.tagged.any()


def test_barcodes_touch_only_the_tag_region():
    d = make_data(seed=0, n_train_per_cell=50, n_val_per_cell=10, n_heldout_per_cell=50)
    assert len({tuple(b) for b in d.barcodes.tolist()}) == d.n_cells  # one barcode per line
    plain = make_data(seed=0, n_train_per_cell=50, n_val_per_cell=10, n_heldout_per_cell=50, shortcut=None)
    insert = d.meta["insert_len"]
    for name in ("train", "heldout"):  # same biology, same draws: only the tags differ
        a, b = getattr(d, name), getattr(plain, name)
        assert torch.equal(a.x[:, :, :insert], b.x[:, :, :insert]) and torch.equal(a.y, b.y)
        assert not torch.equal(a.x, b.x)
