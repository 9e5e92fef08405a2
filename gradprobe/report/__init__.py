"""Stage 4: views of the findings: terminal summary, JSON, PDF failure report."""

from .json_view import findings_document, findings_json
from .terminal import summary_lines

__all__ = ["findings_document", "findings_json", "summary_lines"]
