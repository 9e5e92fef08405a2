"""A fifth set of families held out by source (issue 21), written at the start of session 7,
before any rule change of that session, by people who never ran the diagnosis on them. Each
ports a public setup that no family of the corpus or of the first four held-out sets ports,
probed at the documented defaults (no ``roles=``, no ``shared=``), run only by
``run.py --heldout fifth``, once, after the session's rule changes, and reported apart
(docs/validity-heldout5.md)."""

HELDOUT5_MODULES = ("twist", "lfq", "beta_tcvae", "topk_sae", "fader", "kd_hinton", "cagrad",
                    "gpinn", "npair", "lossfree_moe")
