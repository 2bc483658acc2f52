"""A static HTML feature browser over a top-sentences output: opens from disk, no server, no network.

browser/index.html        every latent: frequency, mean activation, meaning, detection score (validated
                          against hand ratings), top promoted tokens; click a column header to sort
browser/latents/N.html    one latent: its activation histogram, top sentences per aggregation with each token
                          shaded by the latent's activation (hover for the value), examples from each quantile
                          of its activating sample, the logit lens with values, sentences where it is silent
                          (random, and those holding its key token), closest latents, steering results
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
import torch
import torch.nn.functional as F

from llama_3.errors import PipelineInputError
from pipeline.core.layout import STEERING_EVAL_DIR
from pipeline.interpret.meanings import load_meanings
from pipeline.report.steering_tables import latent_table
from pipeline.sae.model import TopKSae
from pipeline.steering.results import SteeringEvalOutput, open_for_sae
from pipeline.top_sentences.tables import AGGREGATIONS, SAMPLE, TopSentences

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
CONTEXT_TOKENS = 30  # tokens shown either side of an example's peak


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


def around_peak(tokens: list[str], activations: list[float], peak: float, radius: int = CONTEXT_TOKENS) -> str:
    """The sentence highlighted, cut to `radius` tokens either side of its strongest token (… marks a cut)."""
    at = max(range(len(activations)), key=activations.__getitem__) if activations else 0
    a, b = max(0, at - radius), min(len(tokens), at + radius + 1)
    return ("…" if a else "") + highlight(tokens[a:b], activations[a:b], peak) + ("…" if b < len(tokens) else "")


def histogram_svg(counts: list[int], edges: list[float]) -> str:
    """Bars of the activation histogram over the bins the latent occupies (log-spaced activations on x, log-scaled
    counts on y), with the activation at both ends and at the middle, and the tallest bar's count."""
    occupied = [i for i, c in enumerate(counts) if c]
    if not occupied:
        return "<p>never active: no histogram</p>"
    lo, hi = occupied[0], occupied[-1] + 1
    counts, edges = counts[lo:hi], edges[lo : hi + 1]
    left, width, height, n = 40, 440, 90, len(counts)
    top = max(math.log1p(c) for c in counts)
    bw = width / n
    bars = "".join(
        f"<rect x='{left + i * bw:.1f}' y='{height - math.log1p(c) / top * height:.1f}' width='{max(bw - 1, 1):.1f}' "
        f"height='{math.log1p(c) / top * height:.1f}' fill='#e8871e'><title>activation {edges[i]:.3g}–"
        f"{edges[i + 1]:.3g}: {c} tokens</title></rect>"
        for i, c in enumerate(counts)
        if c
    )
    mid = edges[n // 2]
    return (
        f"<svg width='{left + width + 10}' height='{height + 30}' role='img' aria-label='activation histogram'>"
        f"<line x1='{left}' y1='{height}' x2='{left + width}' y2='{height}' stroke='#999'/>"
        f"<line x1='{left}' y1='0' x2='{left}' y2='{height}' stroke='#999'/>{bars}"
        f"<text x='{left - 4}' y='10' font-size='11' text-anchor='end'>{max(counts)}</text>"
        f"<text x='{left - 4}' y='{height}' font-size='11' text-anchor='end'>0</text>"
        f"<text x='{left}' y='{height + 13}' font-size='11'>{edges[0]:.3g}</text>"
        f"<text x='{left + width / 2}' y='{height + 13}' font-size='11' text-anchor='middle'>{mid:.3g}</text>"
        f"<text x='{left + width}' y='{height + 13}' font-size='11' text-anchor='end'>{edges[-1]:.3g}</text>"
        f"<text x='{left + width / 2}' y='{height + 27}' font-size='11' text-anchor='middle'>activation (log scale); "
        "tokens per bin (log scale)</text></svg>"
    )


def decoder_neighbours(sae_dir: Path, n: int = 5) -> dict[int, list[tuple[int, float]]]:
    """latent -> its n nearest latents by decoder-row cosine, computed in [512, n_latents] blocks (never the full
    [n_latents, n_latents] matrix); {} when the SAE folder is not at hand (a copied top-sentences folder)."""
    try:
        sae = TopKSae.load(sae_dir)
    except PipelineInputError:
        return {}
    with torch.inference_mode():
        rows = F.normalize(sae.W_dec.float(), dim=1)  # [L, d]
        out = {}
        for a in range(0, len(rows), 512):
            cos = rows[a : a + 512] @ rows.T  # [block, L]
            cos[torch.arange(len(cos)), torch.arange(a, a + len(cos))] = -2.0  # not itself
            values, indices = cos.topk(min(n, len(rows) - 1), dim=1)
            for i, (v, j) in enumerate(zip(values.tolist(), indices.tolist())):
                out[a + i] = list(zip(j, v))
    return out


def write_browser(
    data: TopSentences,
    meanings_dir: str | Path,
    target: str | Path,
    per_aggregation: int = 10,
    steering_dir: str | Path | None = STEERING_EVAL_DIR,
) -> Path:
    """Write the browser of a top-sentences output, with the meanings in `meanings_dir` for its SAE and the
    steering evaluation in `steering_dir` (when it evaluated this SAE), to the folder `target` (replaced whole);
    `per_aggregation` sentences per aggregation on each latent page. Returns the index path."""
    target = Path(target)
    out = target.parent
    out.mkdir(parents=True, exist_ok=True)
    meanings = load_meanings(meanings_dir, data.sae_sha256)
    neighbours = decoder_neighbours(data.sae_dir)
    steering = open_for_sae(steering_dir, data.sae_sha256) if steering_dir else None
    steered = {r["latent"]: r for r in steering.latents} if steering else {}
    stats = data.table("latent_stats").to_pylist()
    top = data.table("top_sentences")
    # the top rows shown, and every sample row (its quantiles are cut from all of it)
    top = top.filter(pc.or_(pc.less(top["rank"], per_aggregation), pc.equal(top["aggregation"], SAMPLE))).to_pylist()
    silent = data.table("non_activating").to_pylist()
    random_z = data.manifest.get("logit_lens_random_z")
    sent = {r["sentence_id"]: r for r in data.table("sentences").to_pylist()}
    escaped: dict[str, str] = {}  # token pieces repeat: escape each distinct one once
    for r in sent.values():
        r["tokens"] = [escaped.get(t) or escaped.setdefault(t, html.escape(t)) for t in r["tokens"]]
    by_latent: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in top:
        by_latent[r["latent"]][r["aggregation"]].append(r)
    silent_by: dict[int, list[dict]] = defaultdict(list)
    for r in silent:
        silent_by[r["latent"]].append(r)
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
            extra = extra_sections(i, data, meanings, neighbours.get(i, []), steered.get(i), steering)
            page = latent_page(
                s, by_latent.get(i, {}), silent_by.get(i, []), sent, meanings.get(i), edges, extra, random_z
            )
            (staging / "latents" / f"{i}.html").write_text(page, encoding="utf-8")
        (staging / "index.html").write_text(index_page(data, stats, meanings), encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / "index.html"


def browser_stale(index: str | Path, *inputs: str | Path) -> bool:
    """A browser's index.html is missing or older than one of the files it shows (the parsed meanings' manifest,
    the steering evaluation's results: the evaluation runs after the browser is first written)."""
    index = Path(index)
    if not index.is_file():
        return True
    built = index.stat().st_mtime_ns
    return any(Path(p).is_file() and Path(p).stat().st_mtime_ns > built for p in inputs)


def extra_sections(
    i: int, data: TopSentences, meanings: dict, near: list, steered: dict | None, steering: SteeringEvalOutput | None
) -> str:
    """The latent page's closest latents, its steering results and the command that steers it."""
    parts = []
    if near:
        items = "".join(
            f"<li><a href='{j}.html'>{j}</a> <span class='score'>cos {c:.2f}</span> "
            f"{html.escape(meanings.get(j, {}).get('meaning', ''))}</li>"
            for j, c in near
        )
        parts.append(f"<h2>Closest latents (decoder cosine)</h2><ul>{items}</ul>")
    strength = 4.0
    if steered and steering is not None:
        sae = steered["methods"]["sae"]
        strength = round(sae.get("add_strength") or strength, 2)
        test = sae["test"]
        parts.append(
            "<h2>Steering (this SAE's evaluation, held-out instructions)</h2>"
            f"<p>SAE latent at {sae.get('best_factor')} × the stream's norm: on-concept (concept 2) in "
            f"{test['on_concept']:.0%} of {test['rows']} continuations (unsteered: "
            f"{steered['unsteered']['on_concept']:.0%}), harmonic {test['harmonic']:.2f} (0-2)</p>"
            + latent_table(steering, i)
        )
    command = (
        f"python llama_3_inference.py --sae {data.sae_dir} --steer {i}:add:{strength} --inspect 5 "
        "--chat 'Write a few sentences about a city at night.'"
    )
    parts.append(f"<h2>Steer with it</h2><pre>{html.escape(command)}</pre>")
    return "".join(parts)


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` in place of `target`: readers see the old browser or the new one, whole."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
        os.replace(target, old / "old")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


FILTER_JS = """<script>
const rows=[...document.querySelectorAll('#latents tbody tr')];
function filter(){const q=document.getElementById('q').value.toLowerCase().split(/\\s+/).filter(Boolean);
const minScore=parseFloat(document.getElementById('min-score').value)||0;
const minFreq=(parseFloat(document.getElementById('min-freq').value)||0)/100;let shown=0;
rows.forEach(r=>{const text=r.cells[3].textContent.toLowerCase();const score=parseFloat(r.cells[4].dataset.v);
const freq=parseFloat(r.cells[1].dataset.v);const ok=q.every(w=>text.includes(w)||r.cells[0].textContent===w)
&&(minScore<=0||score>=minScore)&&freq>=minFreq;r.style.display=ok?'':'none';shown+=ok});
document.getElementById('shown').textContent=shown}
['q','min-score','min-freq'].forEach(id=>document.getElementById(id).oninput=filter);filter();
</script>"""


def index_page(data: TopSentences, stats: list[dict], meanings: dict) -> str:
    rows = []
    # best detection score first (the validated score; unscored latents last), as the meanings file
    stats = sorted(stats, key=lambda s: (-(meanings.get(s["latent"], {}).get("score") or -1), s["latent"]))
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
        "<p><input id='q' placeholder='search meanings (or a latent id)' size='40'> detection score ≥ "
        "<input id='min-score' type='number' step='0.05' min='0' max='1' style='width:5em'> frequency ≥ "
        "<input id='min-freq' type='number' step='0.01' min='0' style='width:5em'> % — <span id='shown'></span> "
        "latents shown, best detection score first (click a header to sort)</p>"
        "<table id='latents'><thead><tr><th>latent</th><th>frequency</th><th>mean act.</th><th>meaning</th>"
        f"<th>detection score</th><th>promotes</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return _page("Feature browser", body, SORT_JS + FILTER_JS)


def logit_lens_section(s: dict, random_z: float | None) -> str:
    """Promoted / suppressed output tokens with their logit effects, and a note when they stand out no more than a
    random direction's (older outputs: tokens only)."""

    def tokens(names: list[str], values: list[float] | None, css: str) -> str:
        values = values or [None] * len(names)
        return " ".join(
            f"<span class={css}>{html.escape(t)}" + (f" <small>{v:+.2f}</small>" if v is not None else "") + "</span>"
            for t, v in zip(names, values)
        )

    note = ""
    if random_z is not None and s.get("logit_lens_z") is not None and s["logit_lens_z"] < random_z:
        note = (
            f"<p class='score'>its strongest effect stands out by z = {s['logit_lens_z']:.1f}, below the "
            f"{random_z:.1f} of 95% of random directions: the logit lens says nothing here (the latent acts through "
            "later layers, not the unembedding directly)</p>"
        )
    return (
        "<h2>Logit lens</h2><p class='score'>output logit change per unit of activation, through the final norm and "
        "the unembedding</p>"
        f"<p>promotes {tokens(s['promoted'], s.get('promoted_logits'), 'tok')}</p>"
        f"<p>suppresses {tokens(s['suppressed'], s.get('suppressed_logits'), 'neg-tok')}</p>{note}"
    )


QUANTILES = 4  # the random activating sample shown in this many bands of activation
PER_QUANTILE = 3


def quantile_section(rows: list[dict], sent: dict, peak: float) -> str:
    """The random activating sample (strongest first) cut into QUANTILES bands, a few examples each, shaded against
    the latent's top peak so weak activations look weak."""
    if not rows:
        return ""
    bands = []
    for q in range(QUANTILES):
        band = rows[q * len(rows) // QUANTILES : (q + 1) * len(rows) // QUANTILES]
        if not band:
            continue
        items = "".join(
            f"<div class='s'><span class='score'>{r['score']:.3g}</span>"
            f"{around_peak(sent[r['sentence_id']]['tokens'], r['token_activations'], peak)}</div>"
            for r in band[:PER_QUANTILE]
            if r["sentence_id"] in sent
        )
        bands.append(
            f"<h3>Quantile {q + 1} of {QUANTILES} (peak {band[-1]['score']:.3g} to {band[0]['score']:.3g})</h3>{items}"
        )
    return (
        f"<h2>Examples across its activation range</h2><p class='score'>a random sample of {len(rows)} sentences "
        f"where it fires, strongest first</p>" + "".join(bands)
    )


def latent_page(
    s: dict,
    tops: dict,
    silent_rows: list[dict],
    sent: dict,
    meaning: dict | None,
    edges: list[float],
    extra: str = "",
    random_z: float | None = None,
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
    )
    sections = []
    strongest = max((max(r["token_activations"], default=0) for r in tops.get("max", [])), default=0)
    for agg in AGGREGATIONS:
        rows = tops.get(agg, [])
        peak = max((max(r["token_activations"], default=0) for r in rows), default=0)
        items = "".join(
            f"<div class='s'><span class='score'>{r['score']:.3g}</span>"
            f"{around_peak(sent[r['sentence_id']]['tokens'], r['token_activations'], peak)}</div>"
            for r in rows
        )
        never = "it never fires on a sentence's last token" if agg == "last" else "the latent never fired"
        sections.append(f"<h2>Top sentences by {agg} activation</h2>{items or f'<p>none: {never}</p>'}")
        if agg == "max":
            sections.append(quantile_section(tops.get(SAMPLE, []), sent, strongest))
    sections.append(logit_lens_section(s, random_z))
    kinds = defaultdict(list)
    for r in silent_rows:
        if r["sentence_id"] in sent:
            kinds[r.get("kind") or "random"].append(r)
    silent = "".join(f"<div class='s'>{html.escape(sent[r['sentence_id']]['text'])}</div>" for r in kinds["random"][:5])
    sections.append(f"<h2>Sentences where it does not fire</h2>{silent or '<p>none sampled</p>'}")
    if kinds["shares_token"]:
        token = html.escape(kinds["shares_token"][0]["token"] or "")
        hard = "".join(
            f"<div class='s'>{html.escape(sent[r['sentence_id']]['text'])}</div>" for r in kinds["shares_token"][:5]
        )
        sections.append(
            f"<h2>Silent though they hold its key token <span class=tok>{token}</span></h2>"
            "<p class='score'>the judges' hard negatives: the token at the peak of most of its top sentences, in "
            f"sentences where it stays at zero</p>{hard}"
        )
    return _page(f"Latent {i}", head + "".join(sections) + extra)
