"""Outputs of the defence benchmark, rebuilt from its cell files: tidy CSV, markdown, scatter plots, HTML."""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path

import pandas as pd

from .stats import t_interval

# (metric, header, format) of the markdown/HTML table, in order
COLUMNS = [
    ("accuracy", "accuracy", ".3f"),
    ("personal_accuracy", "personal acc.", ".3f"),
    ("epsilon", "claimed eps", ".2f"),
    ("audit_claimed_epsilon", "claim audited", ".2f"),
    ("audit_epsilon_lb", "audited eps LB", ".2f"),
    ("psnr", "inversion PSNR dB", ".1f"),
    ("class_baseline_psnr", "class-mean PSNR", ".1f"),
    ("baseline_psnr", "mean-image PSNR", ".1f"),
    ("ssim", "SSIM", ".3f"),
    ("class_baseline_ssim", "class-mean SSIM", ".3f"),
    ("record_auc", "record MIA AUC", ".3f"),
    ("record_tpr_at_1pct_fpr", "record TPR@1%FPR", ".3f"),
    ("subject_auc", "subject MIA AUC", ".3f"),
    ("subject_tpr_at_1pct_fpr", "subject TPR@1%FPR", ".3f"),
    ("bytes_up", "MB up", "mb"),
    ("bytes_down", "MB down", "mb"),
    ("wall_s", "train s", ".1f"),
]
STAGE_OF = {"psnr": "inversion", "ssim": "inversion", "class_baseline_ssim": "inversion", "class_baseline_psnr": "inversion", "baseline_psnr": "inversion",
            "record_auc": "record_mia", "audit_claimed_epsilon": "audit", "record_tpr_at_1pct_fpr": "record_mia", "audit_epsilon_lb": "audit",
            "subject_auc": "utility", "subject_tpr_at_1pct_fpr": "utility"}
PLOTS = [("psnr", "inversion PSNR (dB, higher = more leakage)"), ("record_auc", "record MIA AUC (RMIA)"),
         ("subject_auc", "subject MIA AUC"), ("audit_epsilon_lb", "audited epsilon lower bound")]


def tidy(cells: list[dict]) -> pd.DataFrame:
    rows = [{"dataset": c["dataset"], "defence": c["defence"], "seed": c["seed"], "metric": k, "value": float(v)}
            for c in cells if c["status"] == "ok" for k, v in c["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and not math.isnan(float(v))]
    return pd.DataFrame(rows, columns=["dataset", "defence", "seed", "metric", "value"])


def cell_table(cells: list[dict]) -> pd.DataFrame:
    rows = []
    for c in cells:
        rows.append({"dataset": c["dataset"], "defence": c["defence"], "seed": c["seed"], "status": c["status"], "reason": c.get("reason", ""),
                     "not_applicable": "; ".join(f"{k}: {v}" for k, v in c.get("not_applicable", {}).items()),
                     "cell_s": c.get("cell_s"), **{f"{k}_s": v for k, v in c.get("stage_s", {}).items()}})
    return pd.DataFrame(rows)


def _fmt(v: float, fmt: str) -> str:
    if fmt == "mb":
        return f"{v / 1e6:.2f}"
    return f"{v:{fmt}}"


def summary_rows(cells: list[dict], df: pd.DataFrame) -> list[dict]:
    """One row per (dataset, defence): each column's text ("mean ± half", "n/a", "refused") and its numbers."""
    from .defenses import DEFENCES, RECORD_ATTACK, SUBJECT_ATTACK

    order = list(dict.fromkeys((c["dataset"], c["defence"]) for c in cells))
    rows = []
    for ds, de in order:
        group = [c for c in cells if c["dataset"] == ds and c["defence"] == de]
        ok = [c for c in group if c["status"] == "ok"]
        row = {"dataset": ds, "defence": de, "seeds": len(ok), "texts": {}, "values": {}, "notes": []}
        if not ok:
            status = group[0]["status"]
            row["status"] = status
            row["notes"].append(group[0].get("reason", ""))
            rows.append(row)
            continue
        row["status"] = "ok" if len(ok) == len(group) else f"{len(ok)}/{len(group)} seeds ok"
        g = df[(df["dataset"] == ds) & (df["defence"] == de)]
        na = ok[0].get("not_applicable", {})
        for metric, _, fmt in COLUMNS:
            vals = g[g["metric"] == metric]["value"].tolist()
            if not vals:
                stage = STAGE_OF.get(metric)
                why = na.get(stage, "")
                row["texts"][metric] = ("none" if metric == "epsilon" else "not built" if why.startswith("not built")
                                        else "refused" if why.startswith("refused") else "n/a" if why else "-")
                continue
            mean, half = t_interval(vals)
            row["values"][metric] = (mean, half)
            row["texts"][metric] = _fmt(mean, fmt) + ("" if math.isnan(half) else f" ± {_fmt(half, fmt)}")
        d = DEFENCES.get(de) if de in DEFENCES else None
        if d is not None:
            row["notes"].append(d.description + (f" (REDUCED: {d.reduced})" if d.reduced else ""))
        m0 = ok[0]["metrics"]
        if m0.get("privacy_unit"):
            row["notes"].append(f"epsilon per {m0['privacy_unit']}; trust: {m0.get('privacy_trust_model')}")
        for stage, why in na.items():
            row["notes"].append(f"{stage}: {why}")
        if m0.get("inversion_attack"):
            row["notes"].append(f"inversion: {m0['inversion_attack']} (other attacks of the row in the CSV)")
        if "record_auc" in row["values"]:
            n = sorted({int(c["metrics"].get("record_candidates", 0)) for c in ok})
            row["notes"].append(f"record MIA: {RECORD_ATTACK}" + (f", {'/'.join(map(str, n))} candidates" if n != [0] else ""))
            if not all(c["metrics"].get("record_fpr_resolved_1pct", 1) for c in ok):
                row["notes"].append("record TPR@1%FPR unresolved (too few non-members): it is TPR at FPR 0")
        if "subject_auc" in row["values"]:
            row["notes"].append(f"subject MIA: {SUBJECT_ATTACK} on the {int(m0.get('subject_non_members', 0))} non-member subjects not used "
                                "for calibration and the members likewise")
            if not all(c["metrics"].get("subject_fpr_resolved_1pct", 1) for c in ok):
                row["notes"].append("subject TPR@1%FPR unresolved (too few non-member subjects): it is TPR at FPR 0")
        if "audit_epsilon_lb" in row["values"]:
            units = sorted({str(c["metrics"].get("audit_unit")) for c in ok})
            row["notes"].append(f"audit: {'/'.join(units)} canaries against the claim for that unit")
            bad = sum(c["metrics"].get("audit_violated", 0) for c in ok)
            if bad:
                row["notes"].append(f"AUDIT FAILED in {bad} of {len(ok)} seeds (the bound exceeds the claim)")
        rows.append(row)
    return rows


def columns(rows: list[dict], dataset: str) -> list[tuple[str, str, str]]:
    """The table columns that hold a value for some row of ``dataset``."""
    return [c for c in COLUMNS if any(c[0] in r["values"] for r in rows if r["dataset"] == dataset)]


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = list(header)
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        cols = columns(rows, ds)
        lines += ["", f"#### {ds}", "", "| defence | seeds | " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * (len(cols) + 2)]
        notes = []
        for r in rows:
            if r["dataset"] != ds:
                continue
            if r["status"] in ("refused", "failed", "n/a"):
                lines.append(f"| {r['defence']} | 0 | " + " | ".join([r["status"]] * len(cols)) + " |")
            else:
                lines.append(f"| {r['defence']} | {r['seeds']} | " + " | ".join(r["texts"].get(m, "-") for m, _, _ in cols) + " |")
            notes.append(f"- {r['defence']}: " + "; ".join(n for n in r["notes"] if n))
        lines += ["", *notes]
    return "\n".join(lines)


def scatter(rows: list[dict], path: Path, dataset: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["dataset"] == dataset and "accuracy" in r["values"]]
    panels = [(m, label) for m, label in PLOTS if any(m in r["values"] for r in rs)]
    if not rs or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        for r in rs:
            if metric not in r["values"]:
                continue
            (x, xe), (y, ye) = r["values"]["accuracy"], r["values"][metric]
            ax.errorbar(x, y, xerr=None if math.isnan(xe) else xe, yerr=None if math.isnan(ye) else ye, fmt="o", ms=5, capsize=2)
            ax.annotate(r["defence"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if metric in ("record_auc", "subject_auc"):
            ax.axhline(0.5, color="k", lw=0.6, ls="--")
        if metric == "psnr":
            base = [r["values"]["class_baseline_psnr"][0] for r in rs if "class_baseline_psnr" in r["values"]]
            if base:
                ax.axhline(sum(base) / len(base), color="k", lw=0.6, ls="--", label="class-mean baseline")
                ax.legend(fontsize=7)
        ax.set_xlabel("accuracy (server test set)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"privacy vs utility, {dataset} (mean ± 95% t-interval over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def html_report(rows: list[dict], header: list[str], pngs: list[Path], cells: pd.DataFrame, path: Path) -> Path:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fedkd defence benchmark</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}.na{color:#999}"
             ".refused{color:#a40}.failed{color:#c00}img{max-width:100%}</style></head><body><h1>fedkd defence benchmark</h1>"]
    parts += [f"<p>{html.escape(h)}</p>" for h in header if h]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        cols = columns(rows, ds)
        parts.append(f"<h2>{html.escape(ds)}</h2><table><tr><th>defence</th><th>seeds</th>" + "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
                     + "<th>notes</th></tr>")
        for r in (r for r in rows if r["dataset"] == ds):
            if r["status"] in ("refused", "failed", "n/a"):
                tds = f"<td class='{'na' if r['status'] == 'n/a' else r['status']}' colspan='{len(cols)}'>{html.escape(r['status'])}</td>"
            else:
                tds = "".join(f"<td class='{'na' if r['texts'].get(m) in ('n/a', '-') else ''}'>{html.escape(r['texts'].get(m, '-'))}</td>" for m, _, _ in cols)
            note = html.escape("; ".join(n for n in r["notes"] if n))
            parts.append(f"<tr><td>{html.escape(r['defence'])}</td><td>{r['seeds']}</td>{tds}<td style='text-align:left'>{note}</td></tr>")
        parts.append("</table>")
        for p in pngs:
            if p.name == f"defenses-{ds}.png":
                data = base64.b64encode(p.read_bytes()).decode()
                parts.append(f"<p><img alt='privacy vs utility on {html.escape(ds)}' src='data:image/png;base64,{data}'></p>")
    parts.append("<h2>Cells</h2>" + cells.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.1f}"))
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


def read_invocations(out: Path) -> list[dict]:
    import json

    path = Path(out) / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_all(out: Path, cells: list[dict], settings, *, invocations: list[dict]) -> dict[str, Path]:
    out = Path(out)
    df = tidy(cells)
    paths = {"csv": out / "defenses.csv", "cells": out / "cells.csv", "markdown": out / "defenses.md", "html": out / "report.html"}
    df.to_csv(paths["csv"], index=False)
    ct = cell_table(cells)
    ct.to_csv(paths["cells"], index=False)
    quick = any(c.get("quick") for c in cells)
    header = []
    if quick:
        header.append("**WEAKENED ATTACKS (--quick): inversion PSNR/SSIM are not what the attacks can do.**")
    label = cells[0]["settings"] if cells else settings.label()  # what made the cells, not this command's defaults
    header.append(f"Settings: {label}. Cells: {sum(c['status'] == 'ok' for c in cells)} ok, "
                  f"{sum(c['status'] == 'refused' for c in cells)} refused, {sum(c['status'] == 'failed' for c in cells)} failed, "
                  f"{sum(c['status'] not in ('ok', 'refused', 'failed') for c in cells)} other (n/a or diverged). "
                  "Values: mean ± half-width of the 95% Student-t interval over seeds (no ± with one seed).")
    cell_s = ct["cell_s"].dropna().sum() if "cell_s" in ct else 0.0
    for inv in invocations:
        load = inv.get("load_average")
        header.append(f"Ran `{inv['command']}` at {inv['started']}: {inv['cells_run']} cells in {inv['wall_s']:.0f} s"
                      + (f" (load average at the end {load[0]:.1f})." if load else "."))
    header.append(f"Sum of cell times {cell_s:.0f} s; table written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    rows = summary_rows(cells, df)
    paths["markdown"].write_text(markdown(rows, header) + "\n")
    pngs = []
    for ds in dict.fromkeys(c["dataset"] for c in cells):
        p = scatter(rows, out / f"defenses-{ds}.png", ds)
        if p is not None:
            pngs.append(p)
            paths[f"png-{ds}"] = p
    html_report(rows, header, pngs, ct, paths["html"])
    return paths
