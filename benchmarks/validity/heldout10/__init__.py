"""A tenth set of families held out by source (issue 21), written in session 9 after the
ninth set was run and before the rule changes designed on its failures, by people who never
ran the diagnosis on them. Each ports a public setup that no family of the corpus or of the
first nine held-out sets ports, probed at the documented defaults (no ``roles=``, no
``shared=``), run only by ``run.py --heldout tenth``, once, and reported apart
(docs/validity-heldout10.md)."""

HELDOUT10_MODULES = ()
