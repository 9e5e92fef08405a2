"""Text as the report draws it: measured in the report's font, fitted to a width with an
ellipsis, wrapped by measured width, and steps and counts written short."""

from __future__ import annotations

import functools
import re
from typing import Any

import matplotlib as mpl
from matplotlib.font_manager import FontProperties, findfont, get_font
from matplotlib.textpath import TextToPath

_TEXT_TO_PATH = TextToPath()

# The renderers round text widths a little differently: measured widths keep this slack.
_WIDTH_SLACK = 1.03

# What the report draws for a character its font lacks (a control character in a name, a script
# outside DejaVu Sans): a box and a matplotlib warning per page otherwise.
_MISSING = "\ufffd"


def step_label(x: float, _pos: Any = None) -> str:
    """A step written short: ``950``, ``12k``, ``1.5M`` (also a matplotlib tick formatter)."""
    x = float(x)
    if abs(x) >= 1_000_000:
        return f"{x / 1_000_000:g}M"
    if abs(x) >= 10_000:
        return f"{x / 1000:g}k"
    return f"{x:g}"


def count_label(value: Any) -> str:
    """An integer with thousands separators, or a dash when there is none."""
    return "—" if value is None else f"{int(value):,}"


def clip(text: Any, chars: int) -> str:
    """``text`` on one line of at most ``chars`` characters, cut with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= chars else text[: max(chars - 1, 1)].rstrip() + "…"


def plain(text: str) -> str:
    """``text`` drawn as it is: a ``$`` escaped, so that matplotlib never parses a user's name
    (a loss called ``L$_{rec}$``) as mathtext, which fails on what is not valid TeX, and each
    character the report's font cannot draw replaced (:func:`drawable`)."""
    return re.sub(r"(?<!\\)\$", r"\\$", drawable(text))


def drawable(text: str) -> str:
    """``text`` with each character the report's font lacks (line breaks kept) as a space if it
    is white space (a tab, a unit separator), else as U+FFFD; same length."""
    family = tuple(mpl.rcParams["font.family"])
    return "".join(c if c == "\n" or _font_has(c, family) else " " if c.isspace() else _MISSING
                   for c in text)


@functools.lru_cache(maxsize=4096)
def _font_has(char: str, family: tuple[str, ...]) -> bool:
    return get_font(findfont(FontProperties(family=family))).get_char_index(ord(char)) != 0


@functools.lru_cache(maxsize=20000)
def width_pt(text: str, size: float, weight: str = "normal", family: str | None = None) -> float:
    """Width of ``text`` in points, as the report's font draws it."""
    fp = FontProperties(size=size, weight=weight, family=family or mpl.rcParams["font.family"])
    return _TEXT_TO_PATH.get_text_width_height_descent(drawable(text), fp, ismath=False)[0]


def fit(text: Any, width_in: float, size: float, weight: str = "normal",
        family: str | None = None) -> str:
    """``text`` on one line of at most ``width_in`` inches, cut with an ellipsis if needed."""
    text = " ".join(str(text).split())
    limit = width_in * 72 / _WIDTH_SLACK
    if width_pt(text, size, weight, family) <= limit:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if width_pt(text[:mid].rstrip() + "…", size, weight, family) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def wrap(text: Any, width_in: float, size: float, weight: str = "normal",
         family: str | None = None) -> list[str]:
    """Greedy word wrap by measured width; a word longer than a line (a list of names with no
    space) is broken across lines, never cut."""
    limit = width_in * 72 / _WIDTH_SLACK
    space = width_pt("a a", size, weight, family) - 2 * width_pt("a", size, weight, family)
    lines: list[str] = []
    line, used = "", 0.0
    for word in _pieces(str(text).split(), limit, size, weight, family):
        w = width_pt(word, size, weight, family)
        if line and used + space + w > limit:
            lines.append(line)
            line, used = "", 0.0
        line = f"{line} {word}" if line else word
        used = used + space + w if used else w
    if line:
        lines.append(line)
    return lines or [""]


def _pieces(words: list[str], limit: float, size: float, weight: str, family: str | None
            ) -> list[str]:
    """``words`` with each one wider than ``limit`` points broken into pieces that fit, after
    a comma where it has one."""
    out = []
    for word in words:
        while width_pt(word, size, weight, family) > limit and len(word) > 1:
            lo, hi = 1, len(word) - 1  # the longest prefix that fits (at least one character)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if width_pt(word[:mid], size, weight, family) <= limit \
                    else (lo, mid - 1)
            cut = lo
            comma = word.rfind(",", 0, cut)
            cut = comma + 1 if comma > 0 else cut
            out.append(word[:cut])
            word = word[cut:]
        out.append(word)
    return out
