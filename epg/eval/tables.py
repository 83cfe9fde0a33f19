"""Result tables of `epg fid`: one result, label modes side by side (method.md §6.4), and a sweep's FID grid."""

from __future__ import annotations

import math

# Row labels of the result tables, in display order.
COLUMNS = {
    "fid": "FID",
    "sfid": "sFID",
    "isc": "IS",
    "precision": "Prec",
    "recall": "Rec",
    "kid": "KID",
}


def _format(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.5f}" if name == "kid" else f"{value:.4f}" if name in ("precision", "recall") else f"{value:.3f}"


def format_results(results: dict[str, float]) -> str:
    """A two-column table (metric, value) of one result dict, with ± std where known."""
    lines = [f"{'metric':<8} value"]
    for key, label in COLUMNS.items():
        if key in results:
            std = results.get(f"{key}_std")
            suffix = f" ± {_format(key, std)}" if std is not None else ""
            lines.append(f"{label:<8} {_format(key, results[key])}{suffix}")
    return "\n".join(lines)


def format_comparison(results: dict[str, dict]) -> str:
    """Rows per mode (e.g. class-balanced vs random labels, method.md §6.4), columns FID, sFID, IS, Prec, Rec, KID."""
    keys = [k for k in COLUMNS if any(k in row for row in results.values())]
    width = max([len("mode"), *(len(mode) for mode in results)])
    lines = [f"{'mode':<{width}}  " + "  ".join(f"{COLUMNS[k]:>8}" for k in keys)]
    for mode, row in results.items():
        lines.append(f"{mode:<{width}}  " + "  ".join(f"{_format(k, row.get(k)):>8}" for k in keys))
    return "\n".join(lines)


def format_sweep(rows: list[dict]) -> str:
    """FID table: one line per CFG scale, one column per EMA copy."""
    weights = list(dict.fromkeys(r["weights"] for r in rows))
    scales = sorted({r["scale"] for r in rows})
    fid = {(r["scale"], r["weights"]): r["fid"] for r in rows}
    width = max(10, *(len(w) for w in weights))
    lines = [f"{'cfg':>6}  " + "  ".join(f"{w:>{width}}" for w in weights)]
    for scale in scales:
        cells = [fid.get((scale, w)) for w in weights]
        lines.append(f"{scale:>6.2f}  " + "  ".join(f"{'-' if c is None else f'{c:.3f}':>{width}}" for c in cells))
    return "\n".join(lines)
