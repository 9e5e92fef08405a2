"""A fourth set of families held out by source (issue 21), written after rule change 20 (the
last of session 6) by people who never ran the diagnosis on them, with no rule change after
it: it judges the rules as they stand. Each ports a public setup that no family of the corpus
or of the first three held-out sets ports, probed at the documented defaults (no ``roles=``,
no ``shared=``), run only by ``run.py --heldout fourth``, once, and reported apart
(docs/validity-heldout4.md)."""

HELDOUT4_MODULES = ("gumbel_dvae", "msn", "deepseek_moe", "wdgrl", "imtl_l", "corinfomax",
                    "kl_annealing_vae", "hard_concrete", "sela")
