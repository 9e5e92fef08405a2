"""wav2vec 2.0's masked contrastive loss with its codebook diversity loss, after Baevski, Zhou,
Mohamed & Auli 2020 ("wav2vec 2.0: A Framework for Self-Supervised Learning of Speech
Representations", NeurIPS; sec. 3.2 the Gumbel-softmax product quantiser, sec. 3.3 eq. 2-4:
L = L_m + alpha L_d, the contrastive L_m over masked steps with K distractors, the diversity
L_d = (GV - perplexity of the batch-averaged softmax) / GV, alpha 0.1) and the official code
facebookresearch/fairseq: ``fairseq/modules/gumbel_vector_quantizer.py``
(``GumbelVectorQuantizer.forward``: ``weight_proj`` to G x V logits, ``prob_perplexity`` from
the batch mean of their softmax, ``code_perplexity`` from the hard one-hots, straight-through
``gumbel_softmax(hard=True)``, codebook ``vars`` (1, G*V, vq_dim / G) uniform init, the
temperature ``max(2 * 0.999995^updates, 0.5)``), ``fairseq/models/wav2vec/wav2vec2.py``
(``Wav2Vec2Model.forward``: masked features replaced by ``mask_emb``, ``sample_negatives``
from the masked steps of the same utterance, ``compute_preds``: cosine over
``logit_temp`` 0.1 with negatives equal to the positive set to -inf; ``get_extra_losses``:
``(num_vars - prob_perplexity) / num_vars``) and ``fairseq/criterions/wav2vec_criterion.py``
(``Wav2vecCriterion``: cross-entropy with target 0 summed over masked steps, each extra
loss times ``sample_size`` and its ``loss_weights`` coefficient, 0.1 for the diversity term:
per masked step, L_m + 0.1 L_d).

Published setup: a CNN feature encoder on raw audio, 65% of the start steps masked with spans
of 10, a 12/24-layer Transformer context network, G = 2 groups of V = 320 entries, K = 100
distractors, temperature 2 -> 0.5, Adam, 400k updates.
Here (no audio, no download): synthetic "utterances" of T = 40 frames of 16-d features drawn
per seed: 12 hidden "phones" follow a random Markov chain (self-transitions excluded), each
held for 2-5 frames, a frame being its phone's fixed random mean plus N(0, 0.5^2) noise.
Feature encoder: two 1-D convolutions (kernel 3, 16 -> 64 -> 32, GELU); quantiser on the
unmasked features, G = 2 groups of V = 16 entries of 8 dimensions (vq_dim 16), ``project_q``
16 -> 16; masking: int(0.65 T / 4 + U) spans of 4 steps (``compute_mask_indices`` scaled);
context network: the masked features replaced by a learned mask embedding, a convolutional
positional embedding (kernel 9, 4 groups) added, two Transformer encoder layers (d 32, 4
heads, feed-forward 64), ``final_proj`` 32 -> 16; K = 10 distractors per masked step from the
other masked steps of its utterance; batch 16, Adam lr 2e-3, 500 steps; the temperature
decays from 2 to 0.5 (reached at 70% of the run, as the published decay reaches 0.5 at 277k of
400k updates). The feature penalty of the code (weight 10, not in eq. 2) is left out.
Losses ``contrastive`` (first; mean over masked steps) and ``diversity`` (weight alpha).
Watched: the selected code vectors (one 8-d row per frame and group, rows of the table) as
the latent ``codewords``, the codebook ``vars`` (32 x 8) as prototypes ``codebook`` of
``codewords``, each row's entry index observed as its group.

Variants (truth by construction):
- ``alpha-0.1``: healthy, as published (L_m + 0.1 L_d).
- ``alpha-0``: the diversity weight 0 (the loss still passed, weighted 0). Nothing pushes the
  quantiser to spread over the codebook: the hard straight-through Gumbel one-hots train only
  the entry each frame takes, and ``compute_preds``'s -inf for distractors equal to the
  positive rewards identical targets, so the utterances settle on fewer entries: a partial
  collapse (the paper does not ablate alpha; weight 0 is the knob that switches the term off).
Measured without gradprobe on 64 held-out utterances (seeds 0 / 1), the quantiser at eval
(hard argmax, fairseq's eval path): entries used of 32 (both groups), ``code_perplexity`` as
fairseq logs it (the sum over groups of exp of the hard usage entropy, at most 32), distinct
(group 1, group 2) pairs used, the phone accuracy of the codes (each code pair's majority
phone, on the same frames; the commonest phone alone scores about 1/12) and the contrastive accuracy on masked steps:
  alpha-0.1: entries used 31 / 30 of 32, code perplexity 27.3 / 23.4, code pairs 103 / 96,
             phone accuracy of the codes 0.736 / 0.687, contrastive accuracy 0.684 / 0.683;
  alpha-0:   entries used 22 / 22 of 32, code perplexity 13.1 / 11.4, code pairs 53 / 45,
             phone accuracy of the codes 0.448 / 0.384, contrastive accuracy 0.725 / 0.729.
Without the diversity term the codebook's perplexity halves (10 entries dead, half the pairs)
and the codes lose a third to two fifths of what they tell about the phones, while the
contrastive objective alone looks as good or better (identical targets are masked out of the
distractors): the harm is the codebook's, seen only by its usage.
(Tried: V = 32 entries per group, seed 0: 56 of 64 used, perplexity 36.5 healthy against 29
of 64, 15.6 at alpha 0; the same halving at a higher cost, so V = 16 was kept.)
CPU seconds a run: 15.7-17.8 (500 steps, probe included, one thread).
Expected on ``alpha-0``: ``prototype-collapse`` on ``codebook`` (the usage of the entries
halves: perplexity 11-13 against 23-27, 10 of 32 entries dead, the codes' phone information
cut by 0.29-0.30). Allowed there: ``inert-loss`` on ``diversity`` (weight 0, it trains nothing),
``prototype-stale`` on ``codebook`` (the dead entries get no gradient and stand still),
``representation-collapse`` on ``codewords`` (the selected rows take few values).
Must not (both): ``non-finite``, ``gradient-conflict``, ``static-loss-weights``; healthy also
``prototype-collapse``, ``prototype-stale``, ``inert-loss``, ``representation-collapse``,
``gradient-swamping`` (the 0.1-weighted diversity term is small beside L_m by design and
does its job: the codebook stays in use).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..harness import Expect, Family, Variant

PHONES, FEAT, FRAMES, BATCH, EVAL_UTTERANCES = 12, 16, 40, 16, 64
GROUPS, ENTRIES, VAR_DIM, FINAL_DIM, HIDDEN = 2, 16, 8, 16, 32
MASK_PROB, MASK_LEN, DISTRACTORS, LOGIT_TEMP = 0.65, 4, 10, 0.1
STEPS, LR, TEMP_MAX, TEMP_MIN = 500, 2e-3, 2.0, 0.5
TEMP_DECAY = (TEMP_MIN / TEMP_MAX) ** (1.0 / (0.7 * STEPS))
ALPHA = {"alpha-0.1": 0.1, "alpha-0": 0.0}


class Utterances:
    """Phone sequences from a random Markov chain, each phone held 2-5 frames, frames its
    mean plus noise; all drawn from the seed."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.means = torch.randn(PHONES, FEAT, generator=self.gen)
        trans = torch.rand(PHONES, PHONES, generator=self.gen) ** 3
        trans.fill_diagonal_(0.0)
        self.trans = trans / trans.sum(1, keepdim=True)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        phones = torch.empty(n, FRAMES, dtype=torch.long)
        for i in range(n):
            t, p = 0, int(torch.randint(PHONES, (1,), generator=self.gen))
            while t < FRAMES:
                hold = int(torch.randint(2, 6, (1,), generator=self.gen))
                phones[i, t:t + hold] = p
                t += hold
                p = int(torch.multinomial(self.trans[p], 1, generator=self.gen))
        x = self.means[phones] + 0.5 * torch.randn(n, FRAMES, FEAT, generator=self.gen)
        return x, phones


class GumbelQuantizer(nn.Module):
    """``GumbelVectorQuantizer`` (combine_groups False, weight_proj_depth 1)."""

    def __init__(self):
        super().__init__()
        self.vars = nn.Parameter(torch.rand(GROUPS * ENTRIES, VAR_DIM))
        self.weight_proj = nn.Linear(HIDDEN, GROUPS * ENTRIES)
        nn.init.normal_(self.weight_proj.weight, 0.0, 1.0)
        nn.init.zeros_(self.weight_proj.bias)

    def forward(self, z: torch.Tensor, temp: float):
        b, t, _ = z.shape
        logits = self.weight_proj(z.reshape(b * t, -1)).view(b * t, GROUPS, ENTRIES)
        avg_probs = logits.softmax(-1).mean(0)
        prob_perplexity = torch.exp(-(avg_probs * (avg_probs + 1e-7).log()).sum(-1)).sum()
        if self.training:
            onehot = F.gumbel_softmax(logits, tau=temp, hard=True)
        else:
            onehot = F.one_hot(logits.argmax(-1), ENTRIES).float()
        rows = onehot.view(b * t, GROUPS * ENTRIES, 1) * self.vars  # only the taken rows
        words = rows.view(b * t, GROUPS, ENTRIES, VAR_DIM).sum(2)
        index = logits.argmax(-1) + torch.arange(GROUPS) * ENTRIES
        return words.view(b, t, GROUPS * VAR_DIM), words.reshape(-1, VAR_DIM), index, \
            prob_perplexity


class Wav2Vec2Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv1d(FEAT, 64, 3, padding=1), nn.GELU(), nn.Conv1d(64, HIDDEN, 3, padding=1),
            nn.GELU())
        self.layer_norm = nn.LayerNorm(HIDDEN)
        self.mask_emb = nn.Parameter(torch.rand(HIDDEN))
        self.pos_conv = nn.Conv1d(HIDDEN, HIDDEN, 9, padding=4, groups=4)
        layer = nn.TransformerEncoderLayer(HIDDEN, 4, 64, dropout=0.0, batch_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.quantizer = GumbelQuantizer()
        self.project_q = nn.Linear(GROUPS * VAR_DIM, FINAL_DIM)
        self.final_proj = nn.Linear(HIDDEN, FINAL_DIM)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.feature_extractor(x.transpose(1, 2)).transpose(1, 2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, temp: float):
        z = self.features(x)
        q, words, index, prob_perplexity = self.quantizer(z, temp)
        h = torch.where(mask[..., None], self.mask_emb.expand_as(z), z)
        h = h + F.gelu(self.pos_conv(h.transpose(1, 2))).transpose(1, 2)
        c = self.final_proj(self.encoder(h))
        return c, self.project_q(q), words, index, prob_perplexity


def span_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """``compute_mask_indices`` scaled: int(p T / span + U) span starts, spans of MASK_LEN."""
    mask = torch.zeros(n, FRAMES, dtype=torch.bool)
    for i in range(n):
        spans = int(MASK_PROB * FRAMES / MASK_LEN + float(torch.rand(1, generator=gen)))
        starts = torch.randperm(FRAMES - MASK_LEN, generator=gen)[:spans]
        for s in starts.tolist():
            mask[i, s:s + MASK_LEN] = True
    return mask


def contrastive(c: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """L_m (eq. 3) over the masked steps: each step's positive (its own quantised target)
    against DISTRACTORS targets of other masked steps of its utterance, cosine / 0.1,
    distractors equal to the positive set to -inf (``compute_preds``); also the accuracy."""
    losses, correct = [], []
    for i in range(len(c)):
        steps = mask[i].nonzero().squeeze(1)
        m = len(steps)
        pick = torch.randint(m - 1, (m, DISTRACTORS), generator=gen)
        pick = pick + (pick >= torch.arange(m)[:, None]).long()  # never the step itself
        pos, negs = y[i, steps], y[i, steps][pick]
        targets = torch.cat([pos[:, None], negs], 1)
        logits = F.cosine_similarity(c[i, steps][:, None], targets, dim=-1) / LOGIT_TEMP
        neg_is_pos = (pos[:, None] == negs).all(-1)
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(neg_is_pos, float("-inf"))],
                           1)
        losses.append(F.cross_entropy(logits, torch.zeros(m, dtype=torch.long),
                                      reduction="sum"))
        correct.append(((logits.argmax(1) == 0) & (logits[:, 1:].max(1).values
                                                    < logits[:, 0])).float())
    return sum(losses) / int(mask.sum()), float(torch.cat(correct).mean())


def usage(index: torch.Tensor, phones: torch.Tensor) -> dict:
    """Entries used, fairseq's ``code_perplexity``, code pairs and the codes' phone accuracy
    (each pair's majority phone)."""
    code_perplexity = 0.0
    for g in range(GROUPS):
        p = torch.bincount(index[:, g] - g * ENTRIES, minlength=ENTRIES).double() / len(index)
        p = p[p > 0]
        code_perplexity += float(torch.exp(-(p * p.log()).sum()))
    pair = (index[:, 0] * GROUPS * ENTRIES + index[:, 1])
    table = torch.zeros(int(pair.max()) + 1, PHONES)
    table.index_put_((pair, phones), torch.ones(len(pair)), accumulate=True)
    return {"entries_used": float(index.unique().numel()), "entries": float(GROUPS * ENTRIES),
            "code_perplexity": code_perplexity, "code_pairs_used": float(pair.unique().numel()),
            "code_phone_accuracy": float(table.max(1).values.sum() / len(pair))}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = Utterances(seed)
    model = Wav2Vec2Small()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    alpha = ALPHA[variant]
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("codewords")
    probe.watch_prototypes("codebook", model.quantizer.vars, latent="codewords")
    with probe:
        for step in range(STEPS):
            temp = max(TEMP_MAX * TEMP_DECAY ** step, TEMP_MIN)
            x, _ = data.sample(BATCH)
            mask = span_mask(BATCH, gen)
            c, y, words, index, prob_perplexity = model(x, mask, temp)
            probe.observe(codewords=words, groups=index.flatten())
            loss_m, _ = contrastive(c, y, mask, gen)
            num_vars = GROUPS * ENTRIES
            probe.backward({"contrastive": loss_m,
                            "diversity": (num_vars - prob_perplexity) / num_vars},
                           weights={"diversity": alpha})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        x, phones = data.sample(EVAL_UTTERANCES)
        mask = span_mask(EVAL_UTTERANCES, gen)
        c, y, _, index, _ = model(x, mask, TEMP_MIN)
        _, accuracy = contrastive(c, y, mask, gen)
    return {**usage(index.view(-1, GROUPS), phones.flatten()),
            "masked_contrastive_accuracy": accuracy}


_MUST_NOT = ("non-finite", "gradient-conflict", "static-loss-weights")

FAMILY = Family(
    name="wav2vec-diversity",
    source="Baevski, Zhou, Mohamed & Auli 2020 (wav2vec 2.0, NeurIPS, sec. 3.2-3.3 eq. 2-4, "
           "alpha 0.1); facebookresearch/fairseq fairseq/modules/gumbel_vector_quantizer.py, "
           "fairseq/models/wav2vec/wav2vec2.py, fairseq/criterions/wav2vec_criterion.py",
    train=train,
    variants=(
        Variant("alpha-0.1", True,
                "as published: masked contrastive loss with distractors plus 0.1 x the "
                "codebook diversity loss; the Gumbel quantiser keeps its entries in use",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale", "inert-loss",
                                      "representation-collapse", "gradient-swamping")),
        Variant("alpha-0", False,
                "diversity weight 0: nothing spreads the quantiser over its codebook and the "
                "utterances settle on a few entries (measured: entries used and code "
                "perplexity far below the healthy run's)",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=(Expect("inert-loss", "diversity"),
                         Expect("prototype-stale", "codebook"),
                         Expect("representation-collapse", "codewords")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("alpha-0.1", 1), ("alpha-0", 1)),
)
