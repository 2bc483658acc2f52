"""What the interpretation stages need from a top-sentences output, plus the offline explainer and judge.

Offline explainer ("offline-concept", pipeline/interpret/concepts.py): a topic or a token pattern plus tokens, chosen
without the judges' embedders or sentences. Same answer shape as Claude's (an analysis, then a JSON verdict), so the
parse step treats both alike.

Offline judge ("minilm-auroc"): embed the explanation and held-out activating / silent sentences with
all-MiniLM-L6-v2; the AUROC of cosine similarity separating the two sets (0.5 = chance).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import pyarrow.compute as pc
import torch
from tqdm import tqdm

from pipeline.interpret.concepts import EXPLAINER, BackgroundWords, ConceptExplainer, word_set
from pipeline.interpret.embedding import SentenceEncoder
from pipeline.top_sentences.tables import TopSentences

OFFLINE_EXPLAINER = EXPLAINER
BACKGROUND_POOL = 1500  # sentences drawn once: the mined phrases' background rates
BACKGROUND = 500  # of them per latent, minus its own top and silent sentences
MIN_BACKGROUND = 100  # fewer left (a tiny dataset): topped up with the corpus package's sentences
OFFLINE_JUDGE = "minilm-auroc"
SECOND_JUDGE = "e5-auroc"


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


def concept_answers(examples: LatentExamples, latents: list[int], n_train: int, seed: int = 0) -> dict[int, str]:
    """latent -> the concept explainer's answer, from its top n_train sentences against a background sample of the
    other sentences on hand (never this latent's top or silent ones: the judges' held-out sets)."""
    if not latents:
        return {}
    explainer = ConceptExplainer()
    pool = sorted(examples.sentences)
    pool = random.Random(seed).sample(pool, min(BACKGROUND_POOL, len(pool)))
    word_sets = {s: word_set(examples.sentences[s]["text"]) for s in pool}
    pool_words = Counter(g for grams in word_sets.values() for g in grams)
    needed = sorted(set(pool) | {r["sentence_id"] for lat in latents for r in examples.top.get(lat, [])[:n_train]})
    vectors = dict(zip(needed, explainer.space.embed([examples.sentences[s]["text"] for s in needed])))
    stand_ins = random.Random(seed).sample(explainer.corpus_sentences, MIN_BACKGROUND)
    word_sets.update(zip(range(-1, -1 - MIN_BACKGROUND, -1), map(word_set, stand_ins)))
    vectors.update(zip(range(-1, -1 - MIN_BACKGROUND, -1), explainer.space.embed(stand_ins)))
    out = {}
    for lat in tqdm(latents, desc="concept explainer", unit="latent", dynamic_ncols=True, mininterval=2):
        rows = examples.top.get(lat, [])[:n_train]
        judged = {r["sentence_id"] for r in examples.top.get(lat, [])} | set(examples.silent.get(lat, []))
        background = [s for s in pool if s not in judged][:BACKGROUND]
        if not rows:
            continue
        if len(background) < MIN_BACKGROUND:  # tiny data: the corpus package's sentences stand in
            background += [-1 - i for i in range(MIN_BACKGROUND - len(background))]
        sentences = [examples.sentences[r["sentence_id"]] for r in rows]
        train = [(s["tokens"], r["token_activations"], s["text"]) for s, r in zip(sentences, rows)]
        pos = torch.stack([vectors[r["sentence_id"]] for r in rows])
        neg = torch.stack([vectors[s] for s in background])
        words = BackgroundWords(  # rates over the whole pool less this latent's sentences, plus any stand-ins
            pool_words,
            sum(s not in judged for s in pool) + sum(s < 0 for s in background),
            excluded=Counter(g for s in judged if s in word_sets and s >= 0 for g in word_sets[s]),
            added=Counter(g for s in background if s < 0 for g in word_sets[s]),
        )
        explanation = explainer.explain(train, pos, neg, words)
        out[lat] = explanation.answer(len(train), len(background))
    return out


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


def detection_scores(
    meanings: dict[int, str], examples: LatentExamples, n_activating: int, n_silent: int, skip_top: int, encoder
) -> dict[int, float]:
    """latent -> AUROC of cos(meaning, sentence) for its held-out activating vs silent sentences, by an encoder with
    encode(texts, query=...) (MiniLM ignores `query`; e5 embeds meanings as queries, sentences as passages)."""
    splits = {lat: judge_split(examples, lat, n_activating, n_silent, skip_top) for lat in meanings}
    needed = sorted({s for a, b in splits.values() for s in a + b})
    texts = [examples.sentences[s]["text"] for s in needed]
    sent_vec = dict(zip(needed, encoder.encode(texts, query=False))) if needed else {}
    lats = sorted(meanings)
    mean_vec = encoder.encode([meanings[lat] for lat in lats], query=True)
    out = {}
    for lat, m in zip(lats, mean_vec):
        act, sil = splits[lat]
        out[lat] = auroc([float(m @ sent_vec[s]) for s in act], [float(m @ sent_vec[s]) for s in sil])
    return out


def minilm_scores(
    meanings: dict[int, str], examples: LatentExamples, n_activating: int, n_silent: int, skip_top: int, encoder=None
) -> dict[int, float]:
    """The first judge: all-MiniLM-L6-v2."""
    return detection_scores(meanings, examples, n_activating, n_silent, skip_top, encoder or SentenceEncoder())


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
