"""The report stage: views of the findings (terminal summary, JSON, PDF failure report,
comparison of runs). It imports matplotlib and seaborn; nothing on the training path imports it.

Layout: :mod:`.text`, :mod:`.axes`, :mod:`.frames` and :mod:`.diagnosis` are the toolkit both
PDF documents draw with; :mod:`.pages` holds one module per page family; :mod:`.plots` and
:mod:`.compare` assemble the failure report and the comparison, :mod:`.pdf` writes them.
"""

from .compare import comparison_figures, write_comparison_pdf
from .json_view import findings_document, findings_json
from .pdf import write_pdf
from .plots import report_figures, save_figure
from .terminal import comparison_lines, summary_lines

__all__ = ["comparison_figures", "comparison_lines", "findings_document", "findings_json",
           "report_figures", "save_figure", "summary_lines", "write_comparison_pdf", "write_pdf"]
