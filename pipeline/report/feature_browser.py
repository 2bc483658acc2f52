"""A static HTML feature browser over a top-sentences output: opens from disk, no server, no network.

browser/index.html        every latent: frequency, mean activation, meaning, detection score (validated
                          against hand ratings), top promoted tokens; click a column header to sort
browser/latents/N.html    one latent: its activation histogram, promoted / suppressed output
                          tokens, top sentences per aggregation with each token shaded by the
                          latent's activation (hover for the value), and sentences where it is silent
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow.compute as pc

from pipeline.interpret.meanings import load_meanings
from pipeline.top_sentences.tables import AGGREGATIONS, TopSentences

STYLE = """<style>
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:70em;color:#222}
table{border-collapse:collapse;width:100%}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}.num{text-align:right;font-variant-numeric:tabular-nums}
.s{white-space:pre-wrap;margin:2px 0;padding:3px 6px;background:#fafafa;border-left:3px solid #ddd}
.a{border-radius:2px}.score{color:#888;font-size:12px;margin-right:.6em}.tok{display:inline-block;margin:1px 3px;
padding:0 4px;background:#eef;border-radius:3px;white-space:pre}
.neg-tok{display:inline-block;margin:1px 3px;padding:0 4px;background:#fee;border-radius:3px;white-space:pre}
h2{margin-top:1.4em}
</style>"""
SORT_JS = """<script>
document.querySelectorAll('th').forEach((th,i)=>th.onclick=()=>{const tb=th.closest('table').tBodies[0];
const rows=[...tb.rows];const asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const key=r=>{const c=r.cells[i];const v=c.dataset.v!==undefined?c.dataset.v:c.textContent;
const n=parseFloat(v);return isNaN(n)?v.toLowerCase():n};
rows.sort((a,b)=>{const x=key(a),y=key(b);return (x<y?-1:x>y?1:0)*(asc?1:-1)});rows.forEach(r=>tb.appendChild(r))});
</script>"""


def _page(title: str, body: str, script: str = "") -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head>"
        f"<body>{body}{script}</body></html>\n"
    )


STAGING_PREFIX = ".browser-"


def highlight(tokens: list[str], activations: list[float], peak: float) -> str:
    """Tokens (already HTML-escaped) as text, those with activation > 0 shaded in proportion to it
    (title = the value)."""
    parts = []
    for t, a in zip(tokens, activations):
        if a > 0:
            alpha = min(1.0, a / peak) if peak > 0 else 1.0
            parts.append(
                f"<span class='a' style='background:rgba(255,140,0,{0.15 + 0.75 * alpha:.2f})' "
                f"title='{a:.3g}'>{t}</span>"
            )
        else:
            parts.append(t)
    return "".join(parts)


def histogram_svg(counts: list[int], edges: list[float]) -> str:
    """Bars of the log-spaced activation histogram, log-scaled heights; labels at the ends."""
    width, height, n = 480, 90, len(counts)
    top = max((math.log1p(c) for c in counts), default=0) or 1
    bw = width / max(n, 1)
    bars = "".join(
        f"<rect x='{i * bw:.1f}' y='{height - math.log1p(c) / top * height:.1f}' width='{bw - 1:.1f}' "
        f"height='{math.log1p(c) / top * height:.1f}' fill='#e8871e'><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: "
        f"{c}</title></rect>"
        for i, c in enumerate(counts)
        if c
    )
    return (
        f"<svg width='{width}' height='{height + 16}' role='img' aria-label='activation histogram'>{bars}"
        f"<text x='0' y='{height + 13}' font-size='11'>{edges[0]:.3g}</text>"
        f"<text x='{width}' y='{height + 13}' font-size='11' text-anchor='end'>{edges[-1]:.3g}</text></svg>"
    )


def write_browser(data: TopSentences, meanings_dir: str | Path, target: str | Path, per_aggregation: int = 10) -> Path:
    """Write the browser of a top-sentences output, with the meanings in `meanings_dir` for its SAE, to the
    folder `target` (replaced whole); `per_aggregation` sentences per aggregation on each latent page.
    Returns the index path."""
    target = Path(target)
    out = target.parent
    out.mkdir(parents=True, exist_ok=True)
    meanings = load_meanings(meanings_dir, data.sae_sha256)
    stats = data.table("latent_stats").to_pylist()
    top = data.table("top_sentences")
    top = top.filter(pc.less(top["rank"], per_aggregation)).to_pylist()
    silent = data.table("non_activating").to_pylist()
    sent = {r["sentence_id"]: r for r in data.table("sentences").to_pylist()}
    escaped: dict[str, str] = {}  # token pieces repeat: escape each distinct one once
    for r in sent.values():
        r["tokens"] = [escaped.get(t) or escaped.setdefault(t, html.escape(t)) for t in r["tokens"]]
    by_latent: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in top:
        by_latent[r["latent"]][r["aggregation"]].append(r)
    silent_by: dict[int, list[int]] = defaultdict(list)
    for r in silent:
        silent_by[r["latent"]].append(r["sentence_id"])
    # Thousands of pages: written plainly into a staging folder that replaces browser/ whole, not one
    # fsync + rename per page (4,609 of those took seconds on a slow disk, each time meanings change).
    for stale in out.glob(STAGING_PREFIX + "*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        (staging / "latents").mkdir()
        edges = data.field("histogram_edges", list)
        for s in stats:
            i = s["latent"]
            page = latent_page(s, by_latent.get(i, {}), silent_by.get(i, []), sent, meanings.get(i), edges)
            (staging / "latents" / f"{i}.html").write_text(page, encoding="utf-8")
        (staging / "index.html").write_text(index_page(data, stats, meanings), encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / "index.html"


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` in place of `target`: readers see the old browser or the new one, whole."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
        os.replace(target, old / "old")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def index_page(data: TopSentences, stats: list[dict], meanings: dict) -> str:
    rows = []
    for s in stats:
        i, m = s["latent"], meanings.get(s["latent"], {})
        score = m.get("score")
        rows.append(
            f"<tr><td class='num' data-v='{i}'><a href='latents/{i}.html'>{i}</a></td>"
            f"<td class='num' data-v='{s['frequency']:.6g}'>{s['frequency']:.3%}</td>"
            f"<td class='num' data-v='{s['mean_activation']:.6g}'>{s['mean_activation']:.3g}</td>"
            f"<td>{html.escape(m.get('meaning', ''))}</td>"
            "<td class='num' "
            f"data-v='{-1 if score is None else score}'>{'' if score is None else format(score, '.2f')}</td>"
            f"<td>{' '.join(f'<span class=tok>{html.escape(t)}</span>' for t in s['promoted'][:5])}</td></tr>"
        )
    c = data.field("counts", dict)
    meaning_note = f" Meanings: {len(meanings)}." if meanings else " No meanings yet (run the interpretation stage)."
    body = (
        f"<h1>Feature browser</h1><p>SAE <code>{html.escape(str(data.sae_dir))}</code> at "
        f"<code>{html.escape(data.field('inputs.sae_cfg.hook_point', str))}</code>, {c['latents']} latents, "
        f"{c['sentences']} sentences ({c['tokens']} tokens). {c['latents_never_firing']} latents never fire; "
        f"{c['latents_with_top_n']['max']} have a full top {data.field('config.top_n', int)}."
        f"{meaning_note}</p>"
        "<table><thead><tr><th>latent</th><th>frequency</th><th>mean act.</th><th>meaning</th>"
        f"<th>detection score</th><th>promotes</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return _page("Feature browser", body, SORT_JS)


def latent_page(
    s: dict, tops: dict, silent_ids: list[int], sent: dict, meaning: dict | None, edges: list[float]
) -> str:
    i = s["latent"]
    head = f"<p><a href='../index.html'>← all latents</a></p><h1>Latent {i}</h1>"
    if meaning:
        judged = ", ".join(f"{k} {v:.2f}" for k, v in meaning.get("scores", {}).items())
        head += (
            f"<p><b>{html.escape(meaning.get('meaning', ''))}</b></p><p class='score'>detection "
            f"{judged or 'not judged'}; by {html.escape(str(meaning.get('explainer')))} (its own certainty "
            f"{meaning.get('certainty', 0):.2f}, not validated)</p>"
        )
    head += (
        f"<p>fires on {s['frequency']:.3%} of tokens ({s['firing_tokens']}), mean activation when active "
        f"{s['mean_activation']:.3g}</p>{histogram_svg(s['histogram'], edges)}"
        f"<p>promotes {' '.join(f'<span class=tok>{html.escape(t)}</span>' for t in s['promoted'])}</p>"
        f"<p>suppresses {' '.join(f'<span class=neg-tok>{html.escape(t)}</span>' for t in s['suppressed'])}</p>"
    )
    sections = []
    for agg in AGGREGATIONS:
        rows = tops.get(agg, [])
        peak = max((max(r["token_activations"], default=0) for r in rows), default=0)
        items = "".join(
            f"<div class='s'><span class='score'>{r['score']:.3g}</span>"
            f"{highlight(sent[r['sentence_id']]['tokens'], r['token_activations'], peak)}</div>"
            for r in rows
        )
        sections.append(f"<h2>Top sentences by {agg} activation</h2>{items or '<p>none: the latent never fired</p>'}")
    silent = "".join(f"<div class='s'>{html.escape(sent[sid]['text'])}</div>" for sid in silent_ids[:5] if sid in sent)
    sections.append(f"<h2>Sentences where it does not fire</h2>{silent or '<p>none sampled</p>'}")
    return _page(f"Latent {i}", head + "".join(sections))
