"""Text wrapped to a terminal's columns under a hanging indent, for the terminal's findings and
roles: lines break between words, never inside a number, a quoted name or a ``roles={...}``
declaration unless a word is wider than the line."""

from __future__ import annotations

import re
import textwrap

# textwrap breaks at ASCII white space only: this character (of Unicode's private use area,
# so never in a name the user gave, unlike a no-break space) holds a unit on one line and is
# printed as a space.
NO_BREAK = "\ue000"
# Each read as one unit: a quoted name with spaces in it ('val task'; an apostrophe inside a
# word opens none), an arrow between two numbers (0.01 -> 0.98), a difference (sigmoid(x) - y).
_UNITS = re.compile(r"(?<!\w)'[^'\s](?:[^'\n]{0,38}[^'\s])?'(?!\w)|\S+ -> \S+|\S+ - \S+")


def glued(text: str) -> str:
    """``text`` with the spaces inside each unit of ``_UNITS`` made no-break spaces."""
    return _UNITS.sub(lambda m: m.group(0).replace(" ", NO_BREAK), text)


def hanging(text: str, width: int | None, head: str, indent: str) -> list[str]:
    """``head + text`` as one line (``width`` None: a pipe or a log), or wrapped to ``width``
    columns with each following line under ``indent``; a word wider than its line is broken
    only then, so that no line runs past ``width``."""
    if width is None:
        return [head + text.replace(NO_BREAK, " ")]
    lines = []
    for break_long_words in (False, True):
        lines = textwrap.wrap(glued(text), width, initial_indent=head, subsequent_indent=indent,
                              break_on_hyphens=False, break_long_words=break_long_words) or [head]
        if max(map(len, lines)) <= width:
            break
    return [line.replace(NO_BREAK, " ") for line in lines]
