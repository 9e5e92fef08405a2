"""A second set of families held out by source (issue 21), written after the first held-out
set (benchmarks/validity/heldout/) had been run once and so could no longer judge the rules.
Each ports a public setup that no family of the corpus or of the first held-out set ports.
Written by people who never ran the diagnosis on them, probed at the documented defaults (no
``roles=``, no ``shared=``), run only by ``run.py --heldout second``, once, at the end, and
reported apart (docs/validity-heldout2.md)."""

HELDOUT2_MODULES = ("rvq", "gshard_moe", "scan", "tico", "dwa", "pareto_multidigit",
                    "ntk_wave_pinn", "triplet_batch_hard")
