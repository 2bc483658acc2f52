"""An AxBench-style steering evaluation: SAE latents against DiffMean and prompting, same prompts, same judge.

    candidates   the latents (with a meaning) whose decoder direction has the best output score
                 (pipeline/steering/output_score.py), not the most confident input explanation: adding it
                 must raise the next-token probability of its meaning's rare key words (concept
                 tokens); latents whose meaning names none come after, by their promoted tokens
    methods      sae       add the latent's unit decoder row x factor x residual norm (`add` steering)
                 diffmean  add the latent's unit DiffMean direction, same strengths
                 prompt    no steering; the instruction asks for the concept (AxBench's reference)
    strengths    a sweep of factors on the `select` instructions; each (latent, method) is reported
                 on the `test` instructions at the factor with the best mean harmonic score there
    judge        pipeline/steering/judge.py: concept, instruction, fluency (0-2 each), harmonic mean

Every continuation is greedy by default, generated in batches of many rows, each row with its own
steering vector (a zero vector: exactly the clean model).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from llama_3.hooks import HookRunner
from pipeline.steering.judge import (
    concept_references,
    concept_score,
    fluency_score,
    harmonic_mean,
    instruction_score,
)
from pipeline.steering.output_score import output_scores, promoted_tokens
from pipeline.steering.vectors import (
    capture_sums,
    diffmean_directions,
    hook_sums,
    residual_norm,
    sae_directions,
    vector_splice,
)

METHODS = ("sae", "diffmean", "prompt")
# Open-ended requests about the world, not about the assistant (which SmolLM2 answers with "I'm an AI ..."),
# so a continuation has room for a concept.
SELECT_INSTRUCTIONS = (
    "Write a short story about a small village.",
    "Describe a busy market in the morning.",
    "Write a paragraph about the sea.",
)
TEST_INSTRUCTIONS = (
    "Tell me about a walk in the park.",
    "Write a few sentences about a city at night.",
    "Describe what happens at a family dinner.",
)
OUTPUT_SCORE_PROMPTS = ("I think that", "Here is the story of")


def repetition(tokens: list[int]) -> float:
    return 1.0 - len(set(tokens)) / len(tokens) if tokens else 0.0


KEYWORD_STOPWORDS = frozenset(  # English function words, and the words meanings are phrased with
    """a an the and or but nor so yet if then than as of to in on at for with by from into onto over under
about above below across after before between through during without within against among upon off out up
down is are was were be been being am do does did done have has had having will would shall should can
could may might must it its itself this that these those there here he him his himself she her hers herself
they them their theirs themselves we us our ours you your yours i me my mine who whom whose which what when
where why how all any both each either neither every few many much more most other another some such no not
only own same too very also just even ever still again once one mostly mainly often usually
token tokens word words text like""".split()
)


def meaning_keywords(meaning: str) -> list[str]:
    """Key words of a meaning: its quoted strings if it has any (the offline explainer quotes tokens),
    else its content words (>= 3 letters, not stop words); lowercased, unique, in order."""
    quoted = re.findall(r'"([^"]+)"|“([^”]+)”', meaning)
    words = [a or b for a, b in quoted] or re.findall(r"[A-Za-z][A-Za-z'-]{2,}", meaning)
    out: list[str] = []
    for w in words:
        w = w.strip().lower()
        if w and w not in KEYWORD_STOPWORDS and w not in out and any(c.isalnum() for c in w):
            out.append(w)
    return out


def common_words(texts: list[str], share: float = 0.02, min_count: int = 3) -> frozenset[str]:
    """Lowercased words in at least `share` of the texts and at least `min_count` of them: function
    words and the corpus's staples ("the", "from", "which"), which no concept is about."""
    counts: Counter = Counter()
    for t in texts:
        counts.update(set(re.findall(r"[a-z]+", t.lower())))
    floor = max(min_count, share * len(texts))
    return frozenset(w for w, c in counts.items() if c >= floor)


def concept_tokens(meaning: str, tokenizer, common: frozenset[str]) -> list[int]:
    """Ids of the tokens that start the meaning's rare key words (" word", " Word", "word"), each
    decoding to >= 3 letters: what a continuation about the concept would say next. Empty unless rare
    words are most of the meaning's key words ("is", "there", "much" describes grammar, not a concept
    to steer towards)."""
    keywords = meaning_keywords(meaning)
    rare = [w for w in keywords if w.isalpha() and len(w) >= 3 and w not in common]
    if 2 * len(rare) <= len(keywords):
        return []
    ids: list[int] = []
    for word in rare:
        for variant in (" " + word, " " + word.capitalize(), word):
            first = tokenizer.encode(variant, bos=False)[:1]
            if first and len(tokenizer.decode(first).strip()) >= 3 and first[0] not in ids:
                ids.append(first[0])
    return ids


def keyword_hit(text: str, keywords: list[str]) -> bool:
    """A key word (>= 3 characters) starting a word of the text, case-insensitive ("bone" hits "bones")."""
    low = text.lower()
    return any(re.search(r"(?<![a-z0-9])" + re.escape(k), low) for k in keywords if len(k) >= 3)


@dataclass
class Row:
    """One continuation to generate and judge."""

    prompt: int  # index into the evaluation's instructions
    method: str  # "none" (unsteered), "sae", "diffmean", "prompt"
    latent: int | None = None
    factor: float | None = None
    tokens: list[int] = field(default_factory=list)  # the prompt as generated from
    continuation: list[int] = field(default_factory=list)
    text: str = ""
    scores: dict = field(default_factory=dict)


def concept_phrase(meaning: str) -> str:
    """What the prompting baseline asks for: a meaning's quoted key words, else the meaning itself."""
    quoted = meaning_keywords(meaning) if '"' in meaning or "“" in meaning else []
    return ", ".join(quoted[:3]) if quoted else meaning


@torch.inference_mode()
def read_continuations(model, sae, rows: list[Row], max_tokens: int = 2048) -> list[tuple[float, float]]:
    """The clean model re-reads prompt + continuation of each row: (mean per-token loss of the
    continuation, the row's latent's mean SAE activation over the continuation's tokens).

    Rows that share a prompt (every method but prompting uses the instruction as it is) share its
    forward: the prompt is prefilled once into the KV cache, copied to every row, and only the
    continuations run as a right-padded batch after it, about `max_tokens` continuation tokens a batch
    (their logits, [rows, width, vocab] in fp32, are the memory peak: 400 MB at SmolLM2's 49k vocab)."""
    device = model.tok_embeddings.weight.device
    hook = sae.cfg.hook_point
    out: list[tuple[float, float]] = [(math.nan, 0.0)] * len(rows)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        if r.continuation:
            by_prompt.setdefault(tuple(r.tokens), []).append(i)
    for prompt, members in by_prompt.items():
        width = max(len(rows[i].continuation) for i in members)
        step = max(1, max_tokens // width)
        for a in range(0, len(members), step):
            part = members[a : a + step]
            n_p, width = len(prompt), max(len(rows[i].continuation) for i in part)
            conts = torch.zeros(len(part), width, dtype=torch.long)
            key_valid = torch.zeros(len(part), n_p + width, dtype=torch.bool)
            key_valid[:, :n_p] = True
            for b, i in enumerate(part):
                c = rows[i].continuation
                conts[b, : len(c)] = torch.tensor(c)
                key_valid[b, n_p : n_p + len(c)] = True
            model.allocate_kv_cache(len(part), n_p + width)
            try:
                first = model(torch.tensor([prompt], device=device), 0, last_only=True)[0, -1]  # predicts token 0
                model.share_cache_prefix(n_p)
                runner = HookRunner(model.args.n_layers, [hook])
                logits = model(conts.to(device), n_p, key_valid=key_valid.to(device), hooks=runner)  # [b, W, V]
            finally:
                model.free_kv_cache()
            acts = runner.captured[hook]  # [b, W, d]
            for b, i in enumerate(part):
                r, n_c = rows[i], len(rows[i].continuation)
                predicting = torch.cat([first[None], logits[b, : n_c - 1]]).float().log_softmax(-1)  # [n_c, V]
                target = torch.tensor(r.continuation, device=device)
                loss = float(-predicting.gather(1, target[:, None]).mean())
                activation = 0.0
                if r.latent is not None:
                    codes = sae(acts[b, :n_c].float())
                    activation = float((codes.values * (codes.indices == r.latent)).sum() / n_c)
                out[i] = (loss, activation)
    return out


def generate(session, rows: list[Row], offsets: torch.Tensor, sampling: dict, batch_rows: int, progress=None) -> None:
    """Fill each row's continuation; offsets [len(rows), d] (zero rows unsteered)."""
    skip = session.steerable.sae.cfg.tokenization.skip_first_positions
    hook = session.steerable.hook_point
    for a in range(0, len(rows), batch_rows):
        part = rows[a : a + batch_rows]
        device = session.loaded.model.tok_embeddings.weight.device
        splice = vector_splice(offsets[a : a + batch_rows].to(device), skip)  # once per batch, not per token
        for r, c in zip(part, session.gen.generate([r.tokens for r in part], splice={hook: splice}, **sampling)):
            r.continuation, r.text = c.tokens, c.text
        if progress is not None:
            progress.update(len(part))


class Benchmark:
    """State shared by the evaluation's steps (model, SAE, judge, prompts, strengths)."""

    def __init__(
        self,
        session,
        encoder,
        examples,
        meanings: dict[int, str],
        select_instructions,
        test_instructions,
        capture=None,
        capture_sentences: int = 0,
    ):
        """capture: the CaptureOutput that top sentences read sentences 0..capture_sentences-1 from (DiffMean
        reads them there too), or None (the model runs on DiffMean's sentences)."""
        self.session, self.encoder, self.examples, self.meanings = session, encoder, examples, meanings
        self.capture, self.capture_sentences, self.diffmean_source = capture, capture_sentences, ""
        self.sae = session.steerable.sae
        self.model = session.loaded.model
        self.instructions = list(select_instructions) + list(test_instructions)
        self.select = list(range(len(select_instructions)))
        self.test = list(range(len(select_instructions), len(self.instructions)))
        self.prompt_tokens = [self.encode_instruction(t) for t in self.instructions]
        self.skip = self.sae.cfg.tokenization.skip_first_positions
        self.norm = residual_norm(self.model, self.sae.cfg.hook_point, self.prompt_tokens, self.skip)
        self.instruction_vectors = encoder.encode(self.instructions)  # [P, 384]

    def encode_instruction(self, text: str) -> list[int]:
        loaded = self.session.loaded
        if loaded.chat_format is not None:
            return loaded.chat_format.encode_dialog([{"role": "user", "content": text}])
        return self.session.text_prompts([text])[0]

    def output_scores(self, latents: list[int], factor: float, progress=None) -> dict:
        """{"concept": [n] gain of the concept tokens, "promoted": [n] gain of the promoted tokens,
        "concept_tokens": per latent ids, "promoted_tokens": [n, 10] ids} (pipeline/steering/output_score.py)."""
        prompts = self.session.text_prompts(list(OUTPUT_SCORE_PROMPTS))
        directions = sae_directions(self.sae, latents)
        common = common_words([s["text"] for s in self.examples.sentences.values()])
        tokenizer = self.session.loaded.tokenizer
        concept = [concept_tokens(self.meanings[lat], tokenizer, common) for lat in latents]
        promoted = promoted_tokens(self.model, directions, 10).cpu()
        scores = output_scores(
            self.model,
            self.sae.cfg.hook_point,
            directions,
            prompts,
            factor * self.norm,
            self.skip,
            [concept, promoted.tolist()],
            progress=progress,
        )
        return {"concept": scores[0], "promoted": scores[1], "concept_tokens": concept, "promoted_tokens": promoted}

    def diffmean(self, latents: list[int], n_positive: int = 16) -> torch.Tensor:
        """[n, d] unit DiffMean directions from each latent's top sentences and silent sentences."""
        ex = self.examples
        ids: dict[int, int] = {}
        pos, neg = [], []
        for lat in latents:
            p = [r["sentence_id"] for r in ex.top.get(lat, [])[:n_positive]]
            n = list(ex.silent.get(lat, []))
            pos.append([ids.setdefault(s, len(ids)) for s in p])
            neg.append([ids.setdefault(s, len(ids)) for s in n])
        tokenization = self.sae.cfg.tokenization
        if self.capture is not None and max(ids, default=0) < self.capture_sentences:
            sums, counts = capture_sums(
                self.capture, self.sae.cfg.hook_point, list(ids), tokenization.exclude_first_positions
            )
            self.diffmean_source = str(self.capture.directory)
        else:
            texts = [ex.sentences[s]["text"] for s in ids]
            sums, counts = hook_sums(
                self.model, self.sae.cfg.hook_point, tokenization, self.session.loaded.tokenizer, texts
            )
            self.diffmean_source = "model"
        return diffmean_directions(sums, counts, pos, neg)

    def judge(self, rows: list[Row], references: dict) -> None:
        """Fill rows' scores (the unsteered rows first: fluency is relative to them)."""
        reads = read_continuations(self.model, self.sae, rows)
        vectors = self.encoder.encode([r.text for r in rows])  # [R, 384]
        base_loss: dict[int, list[float]] = {}
        for r, (loss, _) in zip(rows, reads):
            if r.method == "none" and math.isfinite(loss):
                base_loss.setdefault(r.prompt, []).append(loss)
        for r, v, (loss, activation) in zip(rows, vectors, reads):
            rel = self.instruction_vectors @ v
            base_losses = base_loss.get(r.prompt, [loss])
            base = sum(base_losses) / len(base_losses)
            repeated = repetition(r.continuation)
            r.scores = {
                "loss": loss,
                "loss_ratio": loss / base if math.isfinite(loss) and base > 0 else math.nan,
                "repetition": repeated,
                "instruction": instruction_score(rel, r.prompt) if r.continuation else 0,
                "fluency": fluency_score(loss, base, repeated) if r.continuation else 0,
                "activation": activation,
            }
            if r.latent is not None:
                ref = references[r.latent]
                similarity = float(v @ ref.vector)
                concept = concept_score(similarity, ref) if r.continuation else 0
                r.scores |= {
                    "similarity": similarity,
                    "concept": concept,
                    "keyword": keyword_hit(r.text, meaning_keywords(self.meanings[r.latent])),
                    "harmonic": harmonic_mean(concept, r.scores["instruction"], r.scores["fluency"]),
                }

    def unsteered_concepts(self, rows: list[Row], latents: list[int], references: dict) -> dict[int, dict]:
        """Per latent, the judge on the unsteered test continuations (how often plain text looks on-concept)."""
        plain = [r for r in rows if r.method == "none" and r.prompt in self.test]
        vectors = self.encoder.encode([r.text for r in plain])
        out = {}
        for lat in latents:
            ref, words = references[lat], meaning_keywords(self.meanings[lat])
            sims = [float(v @ ref.vector) for v in vectors]
            out[lat] = {
                "concept": mean([concept_score(s, ref) for s in sims]),
                "on_concept": mean([float(concept_score(s, ref) >= 1) for s in sims]),
                "keyword": mean([float(keyword_hit(r.text, words)) for r in plain]),
            }
        return out


def mean(values) -> float:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else math.nan


def summarize_rows(rows: list[Row]) -> dict:
    """Means over rows of every judged number; on_concept = share with concept >= 1."""
    keys = ("concept", "instruction", "fluency", "harmonic", "loss_ratio", "repetition", "activation", "keyword")
    out = {k: rounded(mean(r.scores.get(k) for r in rows)) for k in keys}
    out["on_concept"] = rounded(mean(float(r.scores.get("concept", 0) >= 1) for r in rows))
    rated = [r.scores["claude"] for r in rows if "claude" in r.scores]
    if rated:  # the Claude judge's scores of the same continuations
        out["claude"] = {
            k: rounded(mean(c[k] for c in rated)) for k in ("concept", "instruction", "fluency", "harmonic")
        }
        out["claude"]["on_concept"] = rounded(mean(float(c["concept"] >= 1) for c in rated))
        out["claude"]["rated"] = len(rated)
    return out


def rounded(x: float, digits: int = 4) -> float | None:
    """For results.json: NaN (nothing to average) and infinity (nothing to compare with) become null."""
    return round(x, digits) if math.isfinite(x) else None


def add_strength(sae, latent: int, offset_norm: float) -> float | None:
    """The `add` strength (SAE activation units, what the Gradio page and --steer take) whose offset in
    the stream has this norm: with dataset normalisation the row W_dec[l] moves the stream by
    ||W_dec[l]|| / input_scale per unit; per-token normalisation has no single answer (None)."""
    if sae.cfg.normalize == "token":
        return None
    scale = sae.cfg.input_scale if sae.cfg.normalize == "dataset" else 1.0
    return offset_norm * scale / float(sae.W_dec[latent].detach().float().norm())


def evaluate(
    bench: Benchmark,
    pool: list[int],
    n_candidates: int,
    factors: list[float],
    output_factor: float,
    sampling: dict,
    batch_rows: int,
    progress=lambda total, desc: None,
    claude_judge=None,
) -> dict:
    """Output scores over `pool`, then the sweep and the test for the best `n_candidates`: results.json's body.

    claude_judge: None (the offline judge only) or a function [{"concept", "instruction", "response"}] ->
    {item index: {"concept", "instruction", "fluency", "harmonic"}} (steering_judge.run_claude_judge), which
    then also rates every held-out continuation, and the unsteered ones against each latent's concept."""
    bar = progress(len(pool) * len(OUTPUT_SCORE_PROMPTS), "output scores")
    out = bench.output_scores(pool, output_factor, bar)
    if bar is not None:
        bar.close()
    scores, promoted, concept = out["concept"], out["promoted_tokens"], out["concept_tokens"]
    ranked = sorted(  # a latent whose meaning names no rare word cannot be judged on-concept by its words: last
        range(len(pool)),
        key=lambda i: (not concept[i], -float(scores[i]) if concept[i] else -float(out["promoted"][i]), pool[i]),
    )
    candidates = [pool[i] for i in ranked[:n_candidates]]
    # on the host, both: the SAE's rows come from its device, DiffMean's from host sums; the offsets built from
    # them are stacked here and moved to the model's device per batch (vector_splice)
    directions = {"sae": sae_directions(bench.sae, candidates).cpu(), "diffmean": bench.diffmean(candidates).cpu()}
    phrases = {lat: concept_phrase(bench.meanings[lat]) for lat in candidates}  # the key words, not "the tokens"
    references = concept_references(bench.encoder, bench.examples, phrases, candidates)
    steered = ("sae", "diffmean")

    def vector_rows(picks: list[tuple[int, str, float, int]]) -> tuple[list[Row], list[torch.Tensor]]:
        rows, offsets = [], []
        for i, method, factor, p in picks:
            rows.append(Row(p, method, candidates[i], factor, bench.prompt_tokens[p]))
            offsets.append(factor * bench.norm * directions[method][i])
        return rows, offsets

    # 1. the sweep on the select instructions (and every instruction unsteered)
    plain = [Row(p, "none", tokens=bench.prompt_tokens[p]) for p in bench.select + bench.test]
    picks = [(i, m, f, p) for i in range(len(candidates)) for m in steered for f in factors for p in bench.select]
    sweep, sweep_offsets = vector_rows(picks)
    rows = plain + sweep
    d = bench.model.args.dim
    offsets = torch.stack([torch.zeros(d)] * len(plain) + sweep_offsets)
    bar = progress(len(rows), "steering sweep")
    generate(bench.session, rows, offsets, sampling, batch_rows, bar)
    bench.judge(rows, references)
    best: dict[tuple[int, str], float] = {}
    for i in range(len(candidates)):
        for m in steered:
            by_factor = {
                f: mean(
                    r.scores["harmonic"] for r in sweep if r.latent == candidates[i] and r.method == m and r.factor == f
                )
                for f in factors
            }
            best[(i, m)] = max(factors, key=lambda f: (by_factor[f], -f))
    # 2. the test instructions at each (latent, method)'s best factor, and the prompting baseline
    picks = [(i, m, best[(i, m)], p) for i in range(len(candidates)) for m in steered for p in bench.test]
    test, test_offsets = vector_rows(picks)
    for i, lat in enumerate(candidates):
        phrase = concept_phrase(bench.meanings[lat])
        for p in bench.test:
            text = f"{bench.instructions[p]} In your answer, talk about {phrase}."
            test.append(Row(p, "prompt", lat, None, bench.encode_instruction(text)))
            test_offsets.append(torch.zeros(d))
    if bar is not None:
        bar.total += len(test)
        bar.refresh()
    generate(bench.session, test, torch.stack(test_offsets), sampling, batch_rows, bar)
    if bar is not None:
        bar.close()
    bench.judge(test + plain, references)
    unsteered = bench.unsteered_concepts(plain, candidates, references)
    plain_test = [r for r in plain if r.prompt in bench.test]
    claude_unsteered: dict[int, list[dict]] = {}
    if claude_judge is not None:
        items = [(r, r.latent) for r in test] + [(r, lat) for lat in candidates for r in plain_test]
        got = claude_judge(
            [
                {"concept": bench.meanings[lat], "instruction": bench.instructions[r.prompt], "response": r.text}
                for r, lat in items
            ]
        )
        for k, (r, lat) in enumerate(items):
            if k in got and r.method != "none":
                r.scores["claude"] = got[k]
            elif k in got:
                claude_unsteered.setdefault(lat, []).append(got[k])
        for lat in candidates:
            unsteered[lat]["claude_on_concept"] = mean(float(c["concept"] >= 1) for c in claude_unsteered.get(lat, []))
    tokenizer = bench.session.loaded.tokenizer
    latents = []
    for i, lat in enumerate(candidates):
        entry = {
            "latent": lat,
            "meaning": bench.meanings[lat],
            "output_score": round(float(scores[ranked[i]]), 5),
            "concept_tokens": [tokenizer.decode([t]) for t in concept[ranked[i]]],
            "promoted_score": round(float(out["promoted"][ranked[i]]), 5),
            "promoted_tokens": [tokenizer.decode([t]) for t in promoted[ranked[i]].tolist()],
            "concept_thresholds": [rounded(references[lat].tau1), rounded(references[lat].tau2)],
            "unsteered": {k: rounded(v) for k, v in unsteered[lat].items()},
            "methods": {},
        }
        for m in METHODS:
            mine = [r for r in test if r.latent == lat and r.method == m]
            cell = {"test": summarize_rows(mine), "example": mine[0].text if mine else ""}
            if m in steered:
                f = best[(i, m)]
                cell |= {
                    "best_factor": f,
                    "strength": round(f * bench.norm, 4),
                    "sweep": {
                        str(g): summarize_rows(
                            [r for r in sweep if r.latent == lat and r.method == m and r.factor == g]
                        )
                        for g in factors
                    },
                }
                if m == "sae":
                    cell["add_strength"] = add_strength(bench.sae, lat, f * bench.norm)
            entry["methods"][m] = cell
        latents.append(entry)
    summary = {m: summarize_rows([r for r in test if r.method == m]) for m in METHODS}
    summary["unsteered"] = {
        "on_concept": rounded(mean(u["on_concept"] for u in unsteered.values())),
        "keyword": rounded(mean(u["keyword"] for u in unsteered.values())),
        **{k: rounded(mean(r.scores[k] for r in plain_test)) for k in ("instruction", "fluency", "repetition")},
    }
    judged = [r for r in test if "concept" in r.scores]
    if claude_judge is not None:
        summary["unsteered"]["claude_on_concept"] = rounded(mean(u["claude_on_concept"] for u in unsteered.values()))
        both = [r for r in judged if "claude" in r.scores]
        summary["claude_offline_agreement"] = rounded(
            mean(float((r.scores["concept"] >= 1) == (r.scores["claude"]["concept"] >= 1)) for r in both)
        )
    summary["judge_keyword_agreement"] = rounded(
        mean(float((r.scores["concept"] >= 1) == bool(r.scores["keyword"])) for r in judged)
    )
    return {
        "hook_point": bench.sae.cfg.hook_point,
        "residual_norm": round(bench.norm, 4),
        "diffmean_activations": bench.diffmean_source,
        "factors": list(factors),
        "output_factor": output_factor,
        "instructions": {
            "select": [bench.instructions[p] for p in bench.select],
            "test": [bench.instructions[p] for p in bench.test],
        },
        "unsteered_examples": [r.text for r in plain_test],
        "latents": latents,
        "summary": summary,
        "output_scores": {str(lat): round(float(s), 5) for lat, s, c in zip(pool, scores.tolist(), concept) if c},
        "promoted_scores": {str(lat): round(float(s), 5) for lat, s in zip(pool, out["promoted"].tolist())},
    }
