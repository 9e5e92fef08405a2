"""A sixteenth set of families held out by source (issue 21), written in session 13 after the
fifteenth set was run, by people who never ran the diagnosis on them, before the rule changes
made after that run (43, and the remedies of 40-41) were committed. Each ports a public setup
that no family of the corpus or of the first fifteen held-out sets ports, probed at the
documented defaults (no ``roles=``, no ``shared=``), run only by ``run.py --heldout
sixteenth``, once, and reported apart (docs/validity-heldout16.md)."""

HELDOUT16_MODULES = ("x_moe", "rotation_trick_vq", "propos", "temi", "stch", "moco_mtl",
                     "al_pinn", "mcc_da")
