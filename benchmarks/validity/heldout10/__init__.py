"""A tenth set of families held out by source (issue 21), written in session 9 after the
ninth set was run, by people who never ran the diagnosis on them; no rule changed after the
ninth set's run, so both sets judge the rules of changes 1-34. Each ports a public setup that no family of the corpus or of the
first nine held-out sets ports, probed at the documented defaults (no ``roles=``, no
``shared=``), run only by ``run.py --heldout tenth``, once, and reported apart
(docs/validity-heldout10.md)."""

HELDOUT10_MODULES = ("graddrop", "moco_v3", "adda", "mdd", "dec", "idec", "dip_vae",
                     "ladder_vae")
