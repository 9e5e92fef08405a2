"""Report text uses only characters the report's font (DejaVu Sans) can draw: a name holding a
control character or a script the font lacks is drawn with stand-ins, and matplotlib warns of
no missing glyph. On a real run recorded by the Probe, read back with pypdf."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from matplotlib.font_manager import FontProperties, findfont, get_font
from torch import nn

import gradprobe
from gradprobe.report import write_comparison_pdf, write_pdf
from gradprobe.report.text import drawable, plain

pypdf = pytest.importorskip("pypdf")

# A unit separator (chr(31)), a tab, two CJK ideographs and a mathtext-looking name.
NAMES = ("t\x1fask", "漢字", "tab\there", "L$_{rec}$")


def test_drawable_keeps_what_the_font_has_and_replaces_the_rest():
    font = get_font(findfont(FontProperties()))
    assert font.family_name == "DejaVu Sans"
    assert [font.get_char_index(ord(c)) != 0 for c in "\x1f\t漢é…−\ufffd"] == \
        [False, False, False, True, True, True, True]
    assert drawable("t\x1fask") == "t ask" and drawable("tab\there") == "tab here"
    assert drawable("漢字 é…−") == "\ufffd\ufffd é…−"
    assert drawable("two\nlines") == "two\nlines"
    assert plain("L$_{rec}$\x1f") == "L\\$_{rec}\\$ "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run whose four losses carry the names above."""
    path = tmp_path_factory.mktemp("glyphs") / "run.gprobe"
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 8), nn.ModuleList(nn.Linear(8, 1) for _ in NAMES)
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradprobe.Probe(model, shared=trunk, every=1, run_file=path)
    for _ in range(30):
        x = torch.randn(16, 4)
        z = torch.relu(trunk(x))
        probe.backward({name: F.mse_loss(head(z).squeeze(1), x[:, k] * 3 ** k)
                        for k, (name, head) in enumerate(zip(NAMES, heads))})
        opt.step()
        opt.zero_grad()
    probe.close()
    return gradprobe.load_run(path)


def test_a_report_of_names_the_font_lacks_warns_of_no_missing_glyph(run, tmp_path):
    assert run.losses == list(NAMES)
    findings = gradprobe.diagnose(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_pdf(run, findings, tmp_path / "report.pdf")
        write_comparison_pdf([run, run], [findings, findings], tmp_path / "compare.pdf")
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == []
    text = "\n".join(page.extract_text() for page in pypdf.PdfReader(tmp_path / "report.pdf").pages)
    assert "t ask" in text and "tab here" in text and "L$_{rec}$" in text
    assert "\x1f" not in text and "漢" not in text
