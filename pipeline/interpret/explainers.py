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
from pipeline.top_sentences.tables import SAMPLE, TopSentences

OFFLINE_EXPLAINER = EXPLAINER
BACKGROUND_POOL = 1500  # sentences drawn once: the mined phrases' background rates
BACKGROUND = 500  # of them per latent, minus its own top and silent sentences
MIN_BACKGROUND = 100  # fewer left (a tiny dataset): topped up with the corpus package's sentences
OFFLINE_JUDGE = "minilm-auroc"
SECOND_JUDGE = "e5-auroc"


@dataclass
class LatentExamples:
    """Everything about the latents' examples that prompts, explainers and judges use, and how they split: an
    explainer sees a latent's top sentences and half of its random activating sample; the judges test on the other
    half (every activation level) against random silent sentences and hard negatives (silent, with its key token)."""

    top: dict[int, list[dict]]  # latent -> rows of the chosen aggregation, rank order
    sampled: dict[int, list[dict]]  # latent -> its random activating sample's rows, strongest first
    silent: dict[int, list[int]]  # latent -> random non-activating sentence ids
    hard: dict[int, list[int]]  # latent -> non-activating sentence ids that hold its key token
    sentences: dict[int, dict]  # sentence id -> {"text", "tokens"}

    @staticmethod
    def load(data: TopSentences, aggregation: str) -> "LatentExamples":
        t = data.table("top_sentences")
        top, sampled = by_latent(t.filter(pc.equal(t["aggregation"], aggregation)).to_pylist()), {}
        if SAMPLE in set(t.column("aggregation").unique().to_pylist()):  # older outputs have no sample
            sampled = by_latent(t.filter(pc.equal(t["aggregation"], SAMPLE)).to_pylist())
        silent: dict[int, list[int]] = defaultdict(list)
        hard: dict[int, list[int]] = defaultdict(list)
        for r in data.table("non_activating").to_pylist():
            (hard if r.get("kind") == "shares_token" else silent)[r["latent"]].append(r["sentence_id"])
        sentences = {r["sentence_id"]: r for r in data.table("sentences").to_pylist()}
        return LatentExamples(top, sampled, dict(silent), dict(hard), sentences)

    def explainer_rows(self, latent: int, n_top: int) -> list[dict]:
        """What an explainer sees: the top n_top rows, then the sample's even ranks (every activation level)."""
        top = self.top.get(latent, [])[:n_top]
        shown = {r["sentence_id"] for r in top}
        return top + [r for r in self.sampled.get(latent, [])[::2] if r["sentence_id"] not in shown]

    def judge_split(
        self, latent: int, n_activating: int, n_silent: int, n_hard: int, n_top: int
    ) -> tuple[list[int], list[int]]:
        """Held-out test sentences: activating ones from the sample's odd ranks (every activation level), then the
        top ones ranked after n_top, never one an explainer saw (unless none is left: tiny data); silent ones,
        n_silent at random plus n_hard hard negatives."""
        shown = [r["sentence_id"] for r in self.explainer_rows(latent, n_top)]
        held = [r["sentence_id"] for r in self.sampled.get(latent, [])[1::2] + self.top.get(latent, [])[n_top:]]
        held = [s for s in dict.fromkeys(held) if s not in set(shown)][:n_activating]
        if not held:
            held = shown[:n_activating]
        silent = self.silent.get(latent, [])[:n_silent]
        return held, silent + [s for s in self.hard.get(latent, [])[:n_hard] if s not in silent]

    def judged(self, latent: int) -> set[int]:
        """Every sentence a judge may test this latent on: kept out of an explainer's background."""
        rows = self.top.get(latent, []) + self.sampled.get(latent, [])
        return {r["sentence_id"] for r in rows} | set(self.silent.get(latent, [])) | set(self.hard.get(latent, []))


def by_latent(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["latent"]].append(r)
    for v in out.values():
        v.sort(key=lambda r: r["rank"])
    return dict(out)


def concept_answers(examples: LatentExamples, latents: list[int], n_train: int, seed: int = 0) -> dict[int, str]:
    """latent -> the concept explainer's answer, from its explainer rows (top n_train, half the sample) against a
    background sample of the other sentences on hand (never one a judge may test this latent on)."""
    if not latents:
        return {}
    explainer = ConceptExplainer()
    pool = sorted(examples.sentences)
    pool = random.Random(seed).sample(pool, min(BACKGROUND_POOL, len(pool)))
    word_sets = {s: word_set(examples.sentences[s]["text"]) for s in pool}
    pool_words = Counter(g for grams in word_sets.values() for g in grams)
    needed = sorted(set(pool) | {r["sentence_id"] for lat in latents for r in examples.explainer_rows(lat, n_train)})
    vectors = dict(zip(needed, explainer.space.embed([examples.sentences[s]["text"] for s in needed])))
    stand_ins = random.Random(seed).sample(explainer.corpus_sentences, MIN_BACKGROUND)
    word_sets.update(zip(range(-1, -1 - MIN_BACKGROUND, -1), map(word_set, stand_ins)))
    vectors.update(zip(range(-1, -1 - MIN_BACKGROUND, -1), explainer.space.embed(stand_ins)))
    out = {}
    for lat in tqdm(latents, desc="concept explainer", unit="latent", dynamic_ncols=True, mininterval=2):
        rows = examples.explainer_rows(lat, n_train)
        judged = examples.judged(lat)
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


@dataclass(frozen=True)
class TestSet:
    """How many held-out sentences a judge scores each latent on (LatentExamples.judge_split)."""

    activating: int
    silent: int
    hard: int
    skip_top: int  # the explainer saw the top skip_top


def detection_scores(meanings: dict[int, str], examples: LatentExamples, test: TestSet, encoder) -> dict[int, float]:
    """latent -> AUROC of cos(meaning, sentence) for its held-out activating vs silent sentences, by an encoder with
    encode(texts, query=...) (MiniLM ignores `query`; e5 embeds meanings as queries, sentences as passages)."""
    splits = {
        lat: examples.judge_split(lat, test.activating, test.silent, test.hard, test.skip_top) for lat in meanings
    }
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


def minilm_scores(meanings: dict[int, str], examples: LatentExamples, test: TestSet, encoder=None) -> dict[int, float]:
    """The first judge: all-MiniLM-L6-v2."""
    return detection_scores(meanings, examples, test, encoder or SentenceEncoder())


def detection_prompt_sentences(
    examples: LatentExamples, latent: int, test: TestSet, seed: int = 0
) -> tuple[list[str], list[int]]:
    """Shuffled sentences for the Claude judge, and the 1-based numbers of the activating ones."""
    act, sil = examples.judge_split(latent, test.activating, test.silent, test.hard, test.skip_top)
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
