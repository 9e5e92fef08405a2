"""A seventh set of families held out by source (issue 21), written in session 8 before that
session's rule changes, by people who never ran the diagnosis on them. Each ports a public
setup that no family of the corpus or of the first six held-out sets ports, probed at the
documented defaults (no ``roles=``, no ``shared=``), run only by ``run.py --heldout seventh``,
once, and reported apart (docs/validity-heldout7.md)."""

HELDOUT7_MODULES = ("contrastive_clustering", "align_uniform", "mgda_ub", "pcgrad",
                    "causal_pinn", "vmoe", "lifted_structure", "l1_sae", "npid_memory",
                    "free_bits_vae")
