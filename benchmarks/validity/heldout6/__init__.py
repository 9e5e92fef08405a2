"""A sixth set of families held out by source (issue 21), written in session 7 after the
fifth set was run once and before the second round of that session's rule changes, by people
who never ran the diagnosis on them. Each ports a public setup that no family of the corpus or
of the first five held-out sets ports, probed at the documented defaults (no ``roles=``, no
``shared=``), run only by ``run.py --heldout sixth``, once, and reported apart
(docs/validity-heldout6.md)."""

HELDOUT6_MODULES = ("mean_teacher", "fixmatch", "pcl", "koleo", "famo", "deep_coral",
                    "nsfnet_kovasznay", "wae_mmd", "multi_similarity", "mcd")
