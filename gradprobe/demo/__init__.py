"""The record-22 reproduction that ``gradprobe demo`` runs (see :mod:`gradprobe.demo.decoupling`)."""

from .data import DecouplingData, Split, make_data
from .decoupling import (DEFAULT_STEPS, REMEDIES, CellBatchSampler, DecouplingModel, evaluate, train)

__all__ = ["CellBatchSampler", "DEFAULT_STEPS", "DecouplingData", "DecouplingModel", "REMEDIES", "Split",
           "evaluate", "make_data", "train"]
