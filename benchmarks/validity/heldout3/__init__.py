"""A third set of families held out by source (issue 21), written and committed before the rule
work of session 6, after the first two held-out sets had each been run once and so could no
longer judge the rules. Each ports a public setup that no family of the corpus or of the first
two held-out sets ports. Written by people who never ran the diagnosis on them, probed at the
documented defaults (no ``roles=``, no ``shared=``), run only by ``run.py --heldout third``,
once, at the end, and reported apart (docs/validity-heldout3.md)."""

HELDOUT3_MODULES = ("iic", "jukebox_vq", "st_moe", "cdan", "sa_pinn", "auto_weighted_mtl",
                    "vibcreg", "spectral_cl", "protonet", "tag_affinity")
