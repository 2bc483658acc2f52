"""The steering evaluation as HTML tables: the summary per method, and each latent's held-out continuations
side by side with the unsteered one (the report and the feature browser's latent pages show both)."""

from __future__ import annotations

import html

from pipeline.steering.results import SteeringEvalOutput

METHOD_NAMES = {"none": "unsteered", "sae": "SAE latent", "diffmean": "DiffMean", "prompt": "prompting"}
STYLE = (
    "table.steer{border-collapse:collapse;font-size:13px} table.steer td,table.steer th{border:1px solid #ccc;"
    "padding:3px 6px;vertical-align:top;text-align:left} table.steer td.on{background:#eaf6ea}"
    " table.steer .sc{color:#666;font-size:11px;white-space:nowrap}"
)


def percent(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def summary_table(done: SteeringEvalOutput) -> str:
    """Per method: on-concept share (concept 2) with its 95% interval over latents, concept >= 1, the mean
    scores and the harmonic mean, over the held-out rows."""
    head = (
        "<tr><th>method</th><th>rows</th><th>on-concept (concept 2)</th><th>concept ≥ 1</th><th>concept</th>"
        "<th>instruction</th><th>fluency</th><th>harmonic</th></tr>"
    )
    body = []
    for m in ("sae", "diffmean", "prompt", "unsteered"):
        s = done.summary.get(m)
        if not s:
            continue
        low, high = s.get("on_concept_ci") or (None, None)

        def num(k: str) -> str:
            return "–" if s.get(k) is None else f"{s[k]:.2f}"

        body.append(
            f"<tr><td>{METHOD_NAMES.get(m, m)}</td><td>{s['rows']}</td><td>{percent(s['on_concept'])} "
            f"[{percent(low)}, {percent(high)}]</td><td>{percent(s['concept_any'])}</td><td>{num('concept')}</td>"
            f"<td>{num('instruction')}</td><td>{num('fluency')}</td>"
            f"<td>{'–' if m == 'unsteered' else num('harmonic')}</td></tr>"
        )
    return f"<style>{STYLE}</style><table class='steer'>{head}{''.join(body)}</table>"


def latent_table(done: SteeringEvalOutput, latent: int) -> str:
    """One row per held-out instruction: the unsteered text, then each method's, with the judge's concept /
    instruction / fluency scores under each (an on-concept cell is shaded)."""
    entry = next((r for r in done.latents if r["latent"] == latent), None)
    if entry is None:
        return ""
    methods = ["none", "sae", "diffmean", "prompt"]
    factor = {m: entry["methods"][m].get("best_factor") for m in ("sae", "diffmean")}
    head = "".join(f"<th>{METHOD_NAMES[m]}{f' (× {factor[m]} norm)' if factor.get(m) else ''}</th>" for m in methods)
    rows = []
    for line in done.side_by_side(latent):
        cells = []
        for m in methods:
            r = line.get(m)
            if r is None:
                cells.append("<td></td>")
                continue
            scores = f"concept {r.concept} · instruction {r.instruction_score} · fluency {r.fluency}"
            cells.append(
                f"<td class='{'on' if r.on_concept else ''}'>{html.escape(r.text)}<div class='sc'>{scores}</div></td>"
            )
        rows.append(f"<tr><td>{html.escape(line['instruction'])}</td>{''.join(cells)}</tr>")
    return (
        f"<style>{STYLE}</style><p>Concept judged: <b>{html.escape(entry['concept'])}</b> "
        "(offline judge, scores 0-2; shaded: concept 2)</p>"
        f"<table class='steer'><tr><th>instruction</th>{head}</tr>{''.join(rows)}</table>"
    )
