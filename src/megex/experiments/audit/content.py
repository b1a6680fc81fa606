"""The audit report's content, free of any format: sections of paragraphs, lists, tables, code
and figures, every figure already a formatted cell (cells.py). report.md and report.html are
two renderings of this one document, so they say the same thing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import cells

__all__ = ["Code", "Figure", "Items", "Section", "Table", "Text", "document"]

DEFENCES_PLOT = "defenses"


@dataclass
class Text:
    """A paragraph; a label is written in bold before it."""

    text: str
    label: str = ""


@dataclass
class Items:
    """A bulleted list of (label, text); an empty label writes the text alone."""

    items: list[tuple[str, str]]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)


@dataclass
class Code:
    lines: list[str]


@dataclass
class Figure:
    """A plot, by its key (a threat model's key, or 'defenses'); shown where it was drawn."""

    key: str
    alt: str


Block = Text | Items | Table | Code | Figure


@dataclass
class Section:
    heading: str
    level: int
    blocks: list[Block] = field(default_factory=list)


def document(summary: dict[str, Any]) -> list[Section]:
    """The report's sections, in reading order: the answer first, the details after."""
    accuracy = (summary.get("victim") or {}).get("accuracy")
    sections = [_title(summary), _answer(summary)]
    for threat_model in summary.get("threat_models") or []:
        sections += _threat_model(threat_model, accuracy)
    return sections + [
        *_defences(summary),
        _monitors(summary),
        _skipped(summary),
        _caveats(summary),
        _plan(summary),
        _victim(summary),
    ]


def _title(summary: dict[str, Any]) -> Section:
    text = (
        f"Written {summary.get('created') or cells.NA} by megex "
        f"{summary.get('megex_version') or cells.NA} to {summary.get('out') or cells.NA}; "
        f"the audit took {cells.duration(summary.get('wall_s'))}."
    )
    return Section(summary.get("title") or "megex audit", 1, [Text(text)])


def _answer(summary: dict[str, Any]) -> Section:
    blocks: list[Block] = [
        Text(tm.get("verdict") or cells.NA, label=tm.get("title") or tm.get("key", ""))
        for tm in summary.get("threat_models") or []
    ]
    return Section("Answer", 2, blocks or [Text("No attack was run: see Skipped.")])


def _threat_model(tm: dict[str, Any], victim_accuracy: float | None) -> list[Section]:
    pool = tm.get("pool")
    images = "none: the attacker invents every query"
    if pool:
        images = f"{pool.get('spec')} ({pool.get('size')} images)"
        images += f": {pool['description']}" if pool.get("description") else ""
    intro = Items(
        [
            ("Predictions-only attacker", tm["baseline"]),
            ("Map attacker", tm["attacker"]),
            ("Attacker's images", images),
            ("Budgets", ", ".join(cells.queries(b) for b in tm.get("budgets") or []) or cells.NA),
            ("Seeds", cells.listing(tm.get("seeds"))),
        ]
    )
    sections = [
        Section(tm.get("title") or tm["key"], 2, [intro]),
        _accuracy(tm),
        _leakage(tm, victim_accuracy),
    ]
    settings = _settings(tm)
    return sections + ([settings] if settings else [])


def _accuracy(tm: dict[str, Any]) -> Section:
    text = Text(
        f"Clone accuracy on the victim's test split in %, mean over {len(tm.get('seeds') or [])} "
        "seeds with its 95% interval; the difference (maps minus predictions only) is in "
        "percentage points, paired by seed."
    )
    header = [
        "queries",
        f"{tm['baseline']} (predictions only)",
        f"{tm['attacker']} (maps)",
        "difference",
    ]
    rows = [
        [
            cells.queries(row["budget"]),
            cells.pct_interval(row.get("baseline")),
            cells.pct_interval(row.get("attacker")),
            cells.points_interval(row.get("difference")),
        ]
        for row in tm.get("accuracy") or []
    ]
    blocks: list[Block] = [text, Table(header, rows, ["right"] * 4)]
    if tm.get("curves"):
        blocks.append(Figure(tm["key"], f"Clone accuracy against queries: {tm.get('title')}"))
    return Section("Clone accuracy", 3, blocks)


def _leakage(tm: dict[str, Any], victim_accuracy: float | None) -> Section:
    text = Text(
        "How many times more queries the predictions-only attacker needs than the map attacker "
        "to bring its clone to each fraction of the victim's accuracy (median queries over "
        "seeds; 95% interval in brackets; a bound where some runs never reached it)."
    )
    top = max(tm.get("budgets") or [0]) or None
    base, maps = tm["baseline"], tm["attacker"]
    header = ["target", f"{base} reached", f"{maps} reached"]
    header += [f"{base} median queries", f"{maps} median queries", "leakage"]
    rows = [
        [
            cells.target(row["target"], victim_accuracy),
            cells.reached(row.get("baseline_reached"), row.get("runs")),
            cells.reached(row.get("attacker_reached"), row.get("runs")),
            cells.queries(row.get("baseline_median_queries")),
            cells.queries(row.get("attacker_median_queries")),
            cells.leakage(row, top),
        ]
        for row in tm.get("leakage") or []
    ]
    table = Table(header, rows, ["left"] + ["right"] * 4 + ["left"])
    return Section("Queries saved by the maps", 3, [text, table])


def _settings(tm: dict[str, Any]) -> Section | None:
    settings = tm.get("settings") or {}
    if not settings and not tm.get("settings_source"):
        return None
    items = [
        (method, _settings_text(values) if isinstance(values, dict) else str(values))
        for method, values in settings.items()
    ]
    blocks: list[Block] = [Text(f"From {tm.get('settings_source') or cells.NA}.")]
    return Section("Settings", 3, blocks + ([Items(items)] if items else []))


def _settings_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items()) or "defaults"


def _not_run(summary: dict[str, Any], prefix: str) -> Text:
    """'Not run: <why>' from the skipped entries whose part starts with `prefix`."""
    reasons = [
        str(entry.get("why"))
        for entry in summary.get("skipped") or []
        if str(entry.get("part", "")).lower().startswith(prefix)
    ]
    return Text("Not run: " + "; ".join(reasons) + "." if reasons else "Not run.")


def defence_plot_key(threat_model: str) -> str:
    """The key (and file stem) of one threat model's defences plot."""
    return f"{DEFENCES_PLOT}-{threat_model}"


def _defences(summary: dict[str, Any]) -> list[Section]:
    blocks = [b for b in summary.get("defenses") or [] if b.get("rows")]
    if not blocks:
        return [Section("Defences", 2, [_not_run(summary, "defen")])]
    text = Text(
        "Each defence at the largest budget of each threat model. Served accuracy is what "
        "honest users get on the test split (in %, its change against the undefended victim "
        "in points); map cosine compares defended maps with honest ones; taken is the clone "
        "accuracy the defence took from each attacker (points, paired by seed); the maps' "
        "lead is the map attacker's accuracy minus the predictions-only attacker's under the "
        "defence."
    )
    return [Section("Defences", 2, [text])] + [_defence_block(b) for b in blocks]


def _defence_block(block: dict[str, Any]) -> Section:
    names = list(dict.fromkeys(name for row in block["rows"] for name in row.get("attackers", {})))
    header = ["defence", "kind", "served accuracy", "map cosine"]
    for name in names:
        header += [f"{name} clone", f"taken from {name}"]
    header += ["maps' lead", "verdict"]
    rows = [_defence_row(row, names) for row in block["rows"]]
    align = ["left", "left"] + ["right"] * (3 + 2 * len(names)) + ["left"]
    key = str(block.get("threat_model"))
    title = f"{block.get('title') or key}, at {cells.queries(block.get('budget'))} queries"
    figure = Figure(
        defence_plot_key(key), f"Each attacker's clone accuracy under each defence: {title}"
    )
    return Section(title, 3, [Table(header, rows, align), figure])


def _defence_row(row: dict[str, Any], names: list[str]) -> list[str]:
    served = f"{cells.pct(row.get('served_accuracy'))} ({cells.points(row.get('accuracy_change'))})"
    cols = [str(row.get("spec")), str(row.get("kind")), served, cells.ratio(row.get("map_cosine"))]
    for name in names:
        attacker = (row.get("attackers") or {}).get(name) or {}
        cols += [
            cells.pct_interval(attacker.get("accuracy")),
            cells.points_interval(attacker.get("taken")),
        ]
    return cols + [cells.points_interval(row.get("lead")), str(row.get("verdict") or cells.NA)]


def _monitors(summary: dict[str, Any]) -> Section:
    block = summary.get("monitors")
    if not block or not block.get("rows"):
        return Section("Monitors", 2, [_not_run(summary, "monitor")])
    header = ["monitor", "threat model", "attacker", "flagged", "median queries to first flag"]
    rows = [
        [
            str(row.get("monitor")),
            str(row.get("threat_model")),
            str(row.get("method")),
            cells.reached(row.get("flagged_runs"), row.get("runs")),
            cells.queries(row.get("median_first_flag_queries")),
        ]
        for row in block["rows"]
    ]
    blocks: list[Block] = [Table(header, rows, ["left"] * 3 + ["right"] * 2)]
    if block.get("note"):
        blocks.append(Text(str(block["note"])))
    return Section("Monitors", 2, blocks)


def _skipped(summary: dict[str, Any]) -> Section:
    items = [(str(e.get("part")), str(e.get("why"))) for e in summary.get("skipped") or []]
    return Section("Skipped", 2, [Items(items) if items else Text("Nothing was skipped.")])


def _caveats(summary: dict[str, Any]) -> Section:
    items = [("", str(c)) for c in summary.get("caveats") or []]
    return Section("Caveats", 2, [Items(items) if items else Text("None.")])


def _plan(summary: dict[str, Any]) -> Section:
    plan = summary.get("plan") or {}
    limit = plan.get("time_limit_s")
    wall = f"estimated {cells.duration(plan.get('estimated_s'))}, "
    wall += f"took {cells.duration(summary.get('wall_s'))}"
    blocks: list[Block] = [
        Items(
            [
                ("Seeds", cells.listing(plan.get("seeds"))),
                ("Wall time", wall),
                ("Time limit", cells.duration(limit) if limit else "none"),
            ]
        )
    ]
    calibration = plan.get("calibration") or {}
    if calibration:
        rows = [
            [method, cells.per_query(c.get("seconds_per_query")), cells.queries(c.get("queries"))]
            for method, c in calibration.items()
        ]
        blocks.append(Text("Calibration, from which the wall time was estimated:"))
        blocks.append(
            Table(["method", "time per query", "queries"], rows, ["left", "right", "right"])
        )
    reductions = plan.get("reductions") or []
    blocks.append(Text("Reductions to fit the time limit:" if reductions else "No reductions."))
    if reductions:
        blocks.append(Items([("", str(r)) for r in reductions]))
    if plan.get("commands"):
        blocks += [Text("Commands that reproduce it:"), Code([str(c) for c in plan["commands"]])]
    return Section("Plan", 2, blocks)


def _victim(summary: dict[str, Any]) -> Section:
    victim = summary.get("victim") or {}
    shape = " x ".join(str(d) for d in victim.get("input_shape") or []) or cells.NA
    accuracy = f"{cells.pct(victim.get('accuracy'))}% top-1 on the test split"
    if victim.get("accuracy_source"):
        accuracy += f" ({victim['accuracy_source']})"
    items = [
        ("Source", f"{victim.get('source') or cells.NA} ({victim.get('kind') or cells.NA})"),
        ("Dataset", str(victim.get("dataset") or cells.NA)),
        ("Input shape", shape),
        ("Classes", str(victim.get("classes") or cells.NA)),
        ("Accuracy", accuracy),
        ("Explanations", _explanations(summary.get("explanations") or {})),
    ]
    return Section("Victim", 2, [Items(items)])


def _explanations(e: dict[str, Any]) -> str:
    if not e.get("returned"):
        text = "not returned"
    else:
        text = f"{e.get('method') or cells.NA} maps for targets {cells.listing(e.get('targets'))}"
    return f"{text}; {e['note']}" if e.get("note") else text
