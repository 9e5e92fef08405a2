"""Families held out by source (issue 21): each ports a public setup that no family the
rules were designed on ports. Written before the rule work, probed at the documented
defaults (no ``roles=``, no ``shared=``), run only by ``run.py --heldout``, once, at the end."""

HELDOUT_MODULES = ("vq_ema", "dino", "mmoe_synthetic", "shazeer_moe")
