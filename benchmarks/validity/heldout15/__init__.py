"""A fifteenth set of families held out by source (issue 21), written in session 13 after all
fourteen earlier sets had been run and seen, by people who never ran the diagnosis on them,
before the rule changes made in that session were committed. Each ports a public setup that
no family of the corpus or of the first fourteen held-out sets ports, probed at the documented
defaults (no ``roles=``, no ``shared=``), run only by ``run.py --heldout fifteenth``, once, and
reported apart (docs/validity-heldout15.md)."""

HELDOUT15_MODULES = ("vit_vqgan_codes", "stable_moe", "smooth_ap", "self_classifier", "ssl_hsic",
                     "mixed_barlow", "inverse_dirichlet_pinn", "rba_pinn", "db_mtl", "imtl_g")
