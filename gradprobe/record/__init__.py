"""Stage 2: the crash-safe run file, written during training and read back for diagnosis, and
the names of what it holds (:mod:`gradprobe.record.quantities`: every recorded quantity, the
loss roles)."""

from . import quantities
from .background import BackgroundRunWriter
from .follow import CLOSED, GONE, WRITING, change_mark, writer_state
from .load import (STATE_FORMAT, find_state, load_checkpoint, load_run, run_from_bytes,
                   run_from_state)
from .quantities import QUANTITIES, ROLES, Quantity, pair_name, pair_parts, role_declaration
from .run import Run
from .schema import SCHEMA_VERSION, RunFileError
from .store import RunWriter

__all__ = ["BackgroundRunWriter", "CLOSED", "GONE", "QUANTITIES", "Quantity", "ROLES", "Run",
           "RunFileError", "RunWriter", "SCHEMA_VERSION", "STATE_FORMAT", "WRITING",
           "change_mark", "find_state", "load_checkpoint", "load_run", "pair_name", "pair_parts",
           "quantities", "role_declaration", "run_from_bytes", "run_from_state",
           "writer_state"]
