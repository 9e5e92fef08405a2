"""The findings pages show evidence as a small table and sentences, not dictionary dumps."""

from __future__ import annotations

import pytest

import runs
from gradprobe.diagnose import diagnose
from gradprobe.report.evidence import evidence_parts

pypdf = pytest.importorskip("pypdf")

from gradprobe.report.pdf import write_pdf  # noqa: E402


def test_evidence_parts_table_rows_and_sentences():
    rows, sentences = evidence_parts({
        "pair": "task|aux", "median_cosine": -0.98612, "judged_steps": 60, "cancelled": True,
        "task_memorised_at": None, "loss_ratios": {"task": 1.1318, "aux": 0.8112},
        "stalled": ["task"], "thresholds": {"share": 0.6},
        "cosine": {"steps": [0, 2, 118], "values": [-0.967, None, -0.996]},
        "related_findings": [{"id": "gradient-swamping", "subject": "L", "steps": [0, 78]}],
    })
    assert rows == [("pair", "task|aux"), ("median cosine", "-0.986"), ("judged steps", "60"),
                    ("cancelled", "yes"), ("task memorised at", "n/a"),
                    ("loss ratios", "task 1.13, aux 0.811"), ("stalled", "task")]
    assert sentences == [
        "cosine: 3 points from step 0 to 118, -0.967 at the first and -0.996 at the last.",
        "related findings: id gradient-swamping; subject L; steps 0, 78."]


def test_the_pdf_findings_page_reads_as_a_table_and_sentences(tmp_path):
    run = runs.opposed_targets()
    findings = diagnose(run)
    (conflict,) = [f for f in findings if f.id == "gradient-conflict"]
    out = write_pdf(run, findings, tmp_path / "report.pdf")
    text = "\n".join(p.extract_text() for p in pypdf.PdfReader(str(out)).pages)
    detail = text.split("Findings in detail", 1)[1]
    assert "median cosine" in detail and f"{conflict.evidence['median_cosine']:.3g}" in detail
    steps = conflict.evidence["cosine"]["steps"]
    assert f"cosine: {len(steps)} points from step {steps[0]} to {steps[-1]}" in detail
    # No raw dictionaries or JSON keys with underscores in the evidence.
    evidence = detail.split("Evidence", 1)[1].split("Why", 1)[0]
    assert "{" not in evidence and "median_cosine" not in evidence
