"""The report stage: views of the findings (terminal summary, JSON, PDF failure report,
comparison of runs). Its names are imported on first use: the terminal and JSON views import
neither matplotlib nor seaborn (nor does anything on the training path); the PDFs do.

Layout: :mod:`.text`, :mod:`.axes`, :mod:`.frames` and :mod:`.diagnosis` are the toolkit both
PDF documents draw with; :mod:`.pages` holds one module per page family; :mod:`.plots` and
:mod:`.compare` assemble the failure report and the comparison, :mod:`.pdf` writes them.
"""

from gradprobe._lazy import lazy_names

__all__, __getattr__, __dir__ = lazy_names(__name__, {
    ".compare": ("comparison_figures", "write_comparison_pdf"),
    ".json_view": ("findings_document", "findings_json"),
    ".pdf": ("write_pdf",),
    ".plots": ("report_figures", "save_figure"),
    ".terminal": ("comparison_lines", "summary_lines"),
})
