"""What the interpretation stages need from a top-sentences output, plus the offline explainer and judge.

Offline explainer ("offline-ngram"): the tokens that carry the latent's activation mass in its top
sentences, ranked by that mass times how much more often they occur there than in the sentences
where it is silent, with the most common preceding word as context. Same answer shape as Claude's
(an analysis, then a JSON verdict), so the parse step treats both alike.

Offline judge ("minilm-auroc"): embed the explanation and held-out activating / silent sentences with
all-MiniLM-L6-v2; the AUROC of cosine similarity separating the two sets (0.5 = chance).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import pyarrow.compute as pc

from pipeline.interpret.embedding import SentenceEncoder
from pipeline.top_sentences.tables import TopSentences

OFFLINE_EXPLAINER = "offline-ngram"
OFFLINE_JUDGE = "minilm-auroc"


@dataclass
class LatentExamples:
    """Everything about the latents' examples that prompts, explainers and judges use."""

    top: dict[int, list[dict]]  # latent -> rows of the chosen aggregation, rank order
    silent: dict[int, list[int]]  # latent -> non-activating sentence ids
    sentences: dict[int, dict]  # sentence id -> {"text", "tokens"}

    @staticmethod
    def load(data: TopSentences, aggregation: str) -> "LatentExamples":

        t = data.table("top_sentences")
        rows = t.filter(pc.equal(t["aggregation"], aggregation)).to_pylist()
        top: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            top[r["latent"]].append(r)
        for v in top.values():
            v.sort(key=lambda r: r["rank"])
        silent: dict[int, list[int]] = defaultdict(list)
        for r in data.table("non_activating").to_pylist():
            silent[r["latent"]].append(r["sentence_id"])
        sentences = {r["sentence_id"]: r for r in data.table("sentences").to_pylist()}
        return LatentExamples(dict(top), dict(silent), sentences)


def _norm(tok: str) -> str:
    return tok.strip().lower()


def offline_explanation(latent: int, rows: list[dict], silent_ids: list[int], sentences: dict[int, dict]) -> str:
    """An analysis + JSON verdict built from activation-weighted, distinctive tokens."""
    mass: Counter = Counter()
    context: dict[str, Counter] = defaultdict(Counter)
    top_count: Counter = Counter()
    for r in rows:
        toks = sentences[r["sentence_id"]]["tokens"]
        seen = set()
        for i, (tok, a) in enumerate(zip(toks, r["token_activations"])):
            key = _norm(tok)
            if not key:
                continue
            seen.add(key)
            if a > 0:
                mass[key] += a
                prev = next((_norm(t) for t in reversed(toks[:i]) if _norm(t).isalpha()), "")
                if prev:
                    context[key][prev] += a
        top_count.update(seen)
    silent_count: Counter = Counter()
    for sid in silent_ids:
        silent_count.update({_norm(t) for t in sentences.get(sid, {}).get("tokens", []) if _norm(t)})
    n_top, n_silent = max(len(rows), 1), max(len(silent_ids), 1)
    total = sum(mass.values()) or 1.0
    scored = []
    for key, m in mass.items():
        lift = math.log((top_count[key] / n_top + 1e-3) / (silent_count[key] / n_silent + 1e-3))
        scored.append((m / total * max(lift, 0.05), key))
    scored.sort(reverse=True)
    best = [k for _, k in scored[:3]]
    if not best:
        verdict = {"meaning": "no activating tokens", "certainty": 0.0}
        return f"The latent has no activating tokens in its examples.\n{json.dumps(verdict)}"
    share = sum(mass[k] for k in best) / total
    words = ", ".join(f'"{k}"' for k in best)
    ctx = context[best[0]].most_common(1)
    meaning = f"the token{'s' if len(best) > 1 else ''} {words}" + (f' (often after "{ctx[0][0]}")' if ctx else "")
    analysis = (
        f"Key tokens by activation mass: {', '.join(f'{k} ({mass[k] / total:.0%})' for k in best)}. "
        f"They carry {share:.0%} of the activation in {len(rows)} top sentences."
    )
    return f"{analysis}\n{json.dumps({'meaning': meaning, 'certainty': round(min(1.0, share), 3)})}"


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random positive > a random negative), ties count half (Mann-Whitney)."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def judge_split(
    examples: LatentExamples, latent: int, n_activating: int, n_silent: int, skip_top: int
) -> tuple[list[int], list[int]]:
    """Held-out sentences for judging: activating ones ranked after the explainer's skip_top (falling
    back to the top ones when there are too few), and the silent sample."""
    rows = examples.top.get(latent, [])
    held = [r["sentence_id"] for r in rows[skip_top:]][:n_activating]
    if len(held) < n_activating:
        held += [r["sentence_id"] for r in rows[:skip_top] if r["sentence_id"] not in held][: n_activating - len(held)]
    return held, examples.silent.get(latent, [])[:n_silent]


def minilm_scores(
    meanings: dict[int, str], examples: LatentExamples, n_activating: int, n_silent: int, skip_top: int, encoder=None
) -> dict[int, float]:
    """latent -> AUROC of cos(explanation, sentence) for activating vs silent sentences."""

    encoder = encoder or SentenceEncoder()
    splits = {lat: judge_split(examples, lat, n_activating, n_silent, skip_top) for lat in meanings}
    needed = sorted({s for a, b in splits.values() for s in a + b})
    sent_vec = dict(zip(needed, encoder.encode([examples.sentences[s]["text"] for s in needed]))) if needed else {}
    lats = sorted(meanings)
    mean_vec = encoder.encode([meanings[lat] for lat in lats])
    out = {}
    for lat, m in zip(lats, mean_vec):
        act, sil = splits[lat]
        out[lat] = auroc([float(m @ sent_vec[s]) for s in act], [float(m @ sent_vec[s]) for s in sil])
    return out


def detection_prompt_sentences(
    examples: LatentExamples, latent: int, n_activating: int, n_silent: int, skip_top: int, seed: int = 0
) -> tuple[list[str], list[int]]:
    """Shuffled sentences for the Claude judge, and the 1-based numbers of the activating ones."""
    act, sil = judge_split(examples, latent, n_activating, n_silent, skip_top)
    items = [(examples.sentences[s]["text"], True) for s in act] + [(examples.sentences[s]["text"], False) for s in sil]
    random.Random(seed * 1_000_003 + latent).shuffle(items)
    return [t for t, _ in items], [i + 1 for i, (_, is_act) in enumerate(items) if is_act]


def balanced_accuracy(picked: list[int], truth: list[int], n: int) -> float:
    p, t = set(picked), set(truth)
    neg = n - len(t)
    tpr = len(p & t) / len(t) if t else float("nan")
    tnr = (neg - len(p - t)) / neg if neg else float("nan")
    return (tpr + tnr) / 2


def mean(values) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(v) / len(v) if v else None
