"""What each loss is for, as the probe recorded it: the role, where it came from (declared,
the graph, the name), what the loss's graph reaches, and the declaration that overrides it.
Shown by every view of the findings (terminal, JSON, the PDF's run page)."""

from __future__ import annotations

from typing import Any

from gradprobe.diagnose._series import role_records

from .columns import NO_BREAK, hanging

# How each source reads in the views.
_SOURCES = {"declared": "declared", "first": "the first loss (task= picks another)",
            "graph": "from the graph"}
# The short form of a record's ambiguity (the graph of a loss that reaches only its own
# parameters), before the declaration that settles it.
_AMBIGUOUS = "a codebook (fine) or a cut-off head (inert)? settle: "


def source_text(record: dict) -> str:
    """``declared``, ``from the graph (penalty)``, ``from the name ('reg')``..."""
    if record["source"] == "name":
        return f"from the name ('{record['hint']}')" if record.get("hint") else \
            "no hint in the name"
    text = _SOURCES.get(record["source"], record["source"])
    return text + f" ({record['reach']})" if record["source"] == "graph" else text


def reach_notes(record: dict, short: bool = False) -> str:
    """What the graph showed beyond the counts: the watched prototypes a loss reaches, and a
    shared loss other than a task computed on another loss's forward pass (it serves that
    loss; the task's pass is the one the others are computed on). ``short``: for a table
    cell."""
    reaches = "prototypes" if short else "reaches prototypes"
    notes = "".join(f"; {reaches} '{p}'" for p in record.get("prototypes_reached") or ())
    if record.get("reach") == "shared" and record.get("own_pass") is False \
            and record["role"] != "task":
        notes += "; on another's pass" if short else "; on another loss's forward pass"
    return notes


def _short(declaration: str) -> str:
    """``roles={...}`` of a ``Probe(..., roles={...})`` line (the header names the call)."""
    return declaration.removeprefix("Probe(..., ").removesuffix(")")


def roles_lines(run_summary: dict[str, Any], width: int | None) -> list[str]:
    """The terminal's roles block: one loss per entry, wrapped to ``width`` columns (None: one
    line per loss, as a pipe or log gets the findings)."""
    records = role_records(run_summary)
    if not records:
        return []
    name_w = min(max(len(r["name"]) for r in records), 16)
    role_w = max(len(r["role"]) for r in records)
    lines = ["roles (override with Probe(..., roles={...})):"]
    for r in records:
        text = f"{r['name']:<{name_w}} {r['role']:<{role_w}} {source_text(r)}"
        if r.get("reach") and r["source"] != "graph":
            text += f"; reach {r['reach']}"
        text += reach_notes(r)
        declaration = _short(r["override"]).replace(" ", NO_BREAK)
        if r.get("ambiguity"):
            text += f"; {_AMBIGUOUS}{declaration}"
        elif r["source"] in ("graph", "name"):
            text += f"; override: {declaration}"
        lines += hanging(text, width, "  ", " " * (name_w + 3))
    return lines


def roles_json(run_summary: dict[str, Any]) -> list[dict]:
    return [{key: r.get(key) for key in ("name", "role", "source", "hint", "reach",
                                          "reach_summary", "counts", "prototypes_reached",
                                          "own_pass", "override", "ambiguity")}
            for r in role_records(run_summary)]


def roles_table(flow: Any, run_summary: dict[str, Any]) -> None:
    """The PDF run page's table of roles (``flow``: the page's ``frames.TextFlow``)."""
    records = role_records(run_summary)
    if not records:
        return
    flow.heading("Roles")
    columns = ((0.8, "loss"), (2.1, "role"), (3.1, "from"), (5.2, "reach (parameter tensors)"))
    for x, title in columns:
        flow.text(title, x=x, size=7.5, weight="bold", gap=0)
    flow.space(7.5 * 1.45 / 72)
    for r in records:
        counts = ", ".join(f"{n} {key.replace('_', '-')}"
                           for key, n in (r.get("counts") or {}).items() if n)
        reach = f"{r['reach']} ({counts})" if counts else r.get("reach") or "not recorded"
        reach += reach_notes(r, short=True)
        cells = (r["name"], r["role"], source_text(r), reach)
        for (x, _), (x_next, _), cell in zip(columns, columns[1:] + ((flow.X1, ""),), cells):
            flow.text(flow.fit(cell, x, x_next - 0.08, 7.5), x=x, size=7.5, gap=0)
        flow.space(7.5 * 1.45 / 72)
        if r["source"] != "declared":
            note = (_AMBIGUOUS if r.get("ambiguity") else "override: ") + r["override"]
            flow.text(flow.fit(note, 2.1, flow.X1, 7), x=2.1, size=7, colour="#555555")
    flow.space(0.12)
