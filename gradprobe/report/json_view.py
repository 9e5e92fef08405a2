"""The JSON view of the findings (schema in docs/cli.md; stable)."""

from __future__ import annotations

import json
import math
from typing import Any

from gradprobe._version import __version__

from .roles import roles_json


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: write them as null so every parser reads the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def findings_document(run_summary: dict[str, Any], findings: list) -> dict[str, Any]:
    return _finite({"gradprobe": __version__, "run": run_summary,
                    "roles": roles_json(run_summary),
                    "findings": [f.to_dict() for f in findings]})


def findings_json(run_summary: dict[str, Any], findings: list) -> str:
    return json.dumps(findings_document(run_summary, findings), indent=2, allow_nan=False)
