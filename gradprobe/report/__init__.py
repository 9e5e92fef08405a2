"""Stage 4: views of the findings: terminal summary, JSON, PDF failure report, comparison."""

from .compare import write_comparison_pdf
from .json_view import findings_document, findings_json
from .pdf import write_pdf
from .plots import report_figures
from .terminal import comparison_lines, summary_lines

__all__ = ["comparison_lines", "findings_document", "findings_json", "report_figures", "summary_lines",
           "write_comparison_pdf", "write_pdf"]
