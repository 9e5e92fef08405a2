"""The second half of the held-out families (written by a second helper; joined with
``HELDOUT_MODULES`` of ``__init__.py``)."""

HELDOUT_MODULES_B = ("burgers_pinn", "cca_ssg", "supcon_pk", "gradnorm_multitask")
