"""A fourteenth set of families held out by source (issue 21), written in session 12 after the
thirteenth set was run, by people who never ran the diagnosis on them, before the rule changes
made after that run were committed. Each ports a public setup that no family of the corpus or
of the first thirteen held-out sets ports, probed at the documented defaults (no ``roles=``, no
``shared=``), run only by ``run.py --heldout fourteenth``, once, and reported apart
(docs/validity-heldout14.md)."""

HELDOUT14_MODULES = ("simvq", "jointvae", "aligned_mtl", "softadapt_pinn", "ressl",
                     "margin_sampling", "pseudo_label", "bsp", "mod_squad", "jacobian_reg")
