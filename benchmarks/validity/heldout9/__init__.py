"""A ninth set of families held out by source (issue 21), written in session 9 after the
eighth set was run and before the rule changes designed on its failures, by people who never
ran the diagnosis on them. Each ports a public setup that no family of the corpus or of the
first eight held-out sets ports, probed at the documented defaults (no ``roles=``, no
``shared=``), run only by ``run.py --heldout ninth``, once, and reported apart
(docs/validity-heldout9.md)."""

HELDOUT9_MODULES = ("rlw", "vat", "deep_svdd", "decov", "wmse", "clip", "arcface", "proxy_nca",
                    "capacity_vae", "deep_ritz")
