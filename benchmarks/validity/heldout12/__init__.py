"""A twelfth set of families held out by source (issue 21), written in session 11 after the
eleventh set was run, by people who never ran the diagnosis on them, before the rule changes of
session 11. Each ports a public setup that no family of the corpus or of the first eleven
held-out sets ports, probed at the documented defaults (no ``roles=``, no ``shared=``), run
only by ``run.py --heldout twelfth``, once, and reported apart (docs/validity-heldout12.md)."""

HELDOUT12_MODULES = ("wav2vec_diversity", "nash_mtl", "synaptic_intelligence", "lwf", "infogan",
                     "rkd", "xpinn", "data2vec", "orthogonal_projection", "temporal_ensembling")
