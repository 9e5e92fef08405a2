"""An eighth set of families held out by source (issue 21), written in session 9 before that
session's rule changes, by people who never ran the diagnosis on them. Each ports a public
setup that no family of the corpus or of the first seven held-out sets ports, probed at the
documented defaults (no ``roles=``, no ``shared=``), run only by ``run.py --heldout eighth``,
once, and reported apart (docs/validity-heldout8.md)."""

HELDOUT8_MODULES = ("relobralo_pinn", "trades", "factor_vae", "adversarial_debiasing",
                    "siglip", "nnclr", "proxy_anchor", "fitnets", "mixmatch", "deep_infomax")
