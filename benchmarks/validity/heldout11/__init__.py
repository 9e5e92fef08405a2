"""An eleventh set of families held out by source (issue 21), written in session 10 after the
tenth set was run, by people who never ran the diagnosis on them, before the rule changes of
session 10. Each ports a public setup that no family of the corpus or of the first ten
held-out sets ports, probed at the documented defaults (no ``roles=``, no ``shared=``), run
only by ``run.py --heldout eleventh``, once, and reported apart (docs/validity-heldout11.md)."""

HELDOUT11_MODULES = ("protopnet", "softtriple", "dan_mmd", "ewc", "capsnet", "dkd", "info_vae",
                     "mcr2", "deepcluster", "convection_pinn")
