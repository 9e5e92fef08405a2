"""A thirteenth set of families held out by source (issue 21), written in session 12 after the
twelfth set was run, by people who never ran the diagnosis on them, before the rule changes of
session 12 were committed. Each ports a public setup that no family of the corpus or of the
first twelve held-out sets ports, probed at the documented defaults (no ``roles=``, no
``shared=``), run only by ``run.py --heldout thirteenth``, once, and reported apart
(docs/validity-heldout13.md)."""

HELDOUT13_MODULES = ("cvq_vae", "dselect_k", "gradvac", "deepxde_lshape", "odc", "circle_loss",
                     "uda", "adversarial_ae", "srip", "attention_transfer")
