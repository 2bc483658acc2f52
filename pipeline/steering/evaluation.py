"""An AxBench-style steering evaluation: SAE latents against DiffMean and prompting, same prompts, same judge.

    concept      a latent's meaning's concept words (pipeline/steering/concept.py): what the judge looks for
                 and what prompting asks for
    candidates   the latents with concept words whose decoder direction has the best output score
                 (pipeline/steering/output_score.py): adding it must raise the next-token probability of
                 the concept's tokens; latents without concept words only fill the list, by promoted tokens
    methods      sae       add the latent's unit decoder row x factor x residual norm (`add`), or clamp the
                           latent at the same push through the SAE splice (--sae-mode clamp)
                 diffmean  add the latent's unit DiffMean direction, same strengths
                 prompt    no steering; the instruction asks for the concept (AxBench's reference)
    strengths    a sweep of factors on the `select` instructions; each (latent, method) is reported on the
                 `test` instructions at the factor with the best mean harmonic score there, among the
                 factors that changed the text (best_factor)
    judge        pipeline/steering/judge.py: concept, instruction, fluency (0-2 each), harmonic mean; its
                 thresholds fitted to hand ratings (tests/data/steering_ratings)
    rows         every continuation, judged, in results.json (pipeline/steering/results.py reads them)

Every continuation is greedy by default, generated in batches of many rows, each row with its own
steering vector (a zero vector: exactly the clean model).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from llama_3.errors import PipelineInputError
from llama_3.hooks import HookRunner
from pipeline.steering.concept import common_words, concept_phrase, concept_tokens, concept_words, related_words
from pipeline.steering.judge import JudgeItem, OfflineJudge
from pipeline.steering.output_score import output_scores, promoted_tokens
from pipeline.steering.splice import SteeringEntry, sae_splice
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
# so a continuation has room for a concept; no idioms ("a walk in the park" invites a redefinition).
SELECT_INSTRUCTIONS = (
    "Write a short story about a small village.",
    "Describe a busy market in the morning.",
    "Write a paragraph about the sea.",
)
TEST_INSTRUCTIONS = (
    "Write a few sentences about a city at night.",
    "Describe what happens at a family dinner.",
    "Describe a train journey through the countryside.",
    "Write a short letter to a friend about your week.",
    "Explain how to plant a small vegetable garden.",
    "Describe your favourite season and why you like it.",
    "Write a short news report about a local festival.",
    "Describe an old house at the end of a street.",
    "Give some advice to a student starting at a new school.",
    "Write a paragraph about a rainy afternoon.",
)
OUTPUT_SCORE_PROMPTS = ("I think that", "Here is the story of")


def repetition(tokens: list[int]) -> float:
    return 1.0 - len(set(tokens)) / len(tokens) if tokens else 0.0


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
    phase: str = "select"  # "select" (the sweep's instructions) or "test" (held out)
    changed: bool | None = None  # steered text differs from the unsteered text of its instruction
    entry: SteeringEntry | None = None  # steered through the SAE splice (sae_mode clamp, or no error term)
    scores: dict = field(default_factory=dict)


@torch.inference_mode()
def read_continuations(model, sae, rows: list[Row], max_tokens: int = 2048) -> list[tuple[float, float]]:
    """The clean model re-reads prompt + continuation of each row: (mean per-token loss of the
    continuation, the row's latent's mean SAE activation over the continuation's tokens; 0 without an SAE).

    Rows with the same prompt and continuation (the unsteered text judged against every latent's concept, a
    steered text that did not change) are read once: the loss is the same, and each row's activation comes
    from the one [n_c, k] SAE code of the text. Texts that share a prompt (every method but prompting uses
    the instruction as it is) share its forward: the prompt is prefilled once into the KV cache, copied to
    every row, and only the continuations run as a right-padded batch after it, about `max_tokens`
    continuation tokens a batch (their logits, [rows, width, vocab] in fp32, are the memory peak: 400 MB at
    SmolLM2's 49k vocab). A text alone behind its prompt (prompting's: the concept is in the prompt) runs
    whole, right-padded, in a batch of such texts of about `max_tokens` tokens (one at a time, 200 batch-1
    forwards took a third of the reading)."""
    device = model.tok_embeddings.weight.device
    hook = sae.cfg.hook_point if sae is not None else None  # no SAE (the judge's validation): no activation
    out: list[tuple[float, float]] = [(math.nan, 0.0)] * len(rows)
    readers: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}  # distinct (prompt, continuation)
    for i, r in enumerate(rows):
        if r.continuation:
            readers.setdefault((tuple(r.tokens), tuple(r.continuation)), []).append(i)
    by_prompt: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for prompt, continuation in readers:
        by_prompt.setdefault(prompt, []).append(continuation)

    def finish(prompt, c, predicting: torch.Tensor, acts: torch.Tensor | None) -> None:
        """predicting [n_c, V] the logits that predict each continuation token; acts [n_c, d] at the hook."""
        n_c = len(c)
        loss = float(-predicting.float().log_softmax(-1).gather(1, torch.tensor(c, device=device)[:, None]).mean())
        codes = sae(acts.float()) if acts is not None else None
        for i in readers[(prompt, c)]:
            latent = rows[i].latent
            activation = 0.0
            if latent is not None and codes is not None:
                activation = float((codes.values * (codes.indices == latent)).sum() / n_c)
            out[i] = (loss, activation)

    singles = sorted(((p, t[0]) for p, t in by_prompt.items() if len(t) == 1), key=lambda pc: len(pc[0] + pc[1]))
    step = max(1, max_tokens // max((len(p + c) for p, c in singles), default=1))
    for a in range(0, len(singles), step):
        part = singles[a : a + step]
        width = max(len(p + c) for p, c in part)
        tokens = torch.zeros(len(part), width, dtype=torch.long)  # right padding: no real token attends to it
        for b, (p, c) in enumerate(part):
            tokens[b, : len(p + c)] = torch.tensor(p + c)
        runner = HookRunner(model.args.n_layers, [hook] if hook else [])
        logits = model(tokens.to(device), 0, hooks=runner)  # [b, width, V]
        acts = runner.captured.get(hook)
        for b, (p, c) in enumerate(part):
            n_p, n_c = len(p), len(c)
            finish(p, c, logits[b, n_p - 1 : n_p + n_c - 1], acts[b, n_p : n_p + n_c] if acts is not None else None)
    for prompt, texts in by_prompt.items():
        if len(texts) == 1:
            continue
        step = max(1, max_tokens // max(map(len, texts)))
        for a in range(0, len(texts), step):
            part = texts[a : a + step]
            n_p, width = len(prompt), max(map(len, part))
            conts = torch.zeros(len(part), width, dtype=torch.long)
            key_valid = torch.zeros(len(part), n_p + width, dtype=torch.bool)
            key_valid[:, :n_p] = True
            for b, c in enumerate(part):
                conts[b, : len(c)] = torch.tensor(c)
                key_valid[b, n_p : n_p + len(c)] = True
            model.allocate_kv_cache(len(part), n_p + width)
            try:
                first = model(torch.tensor([prompt], device=device), 0, last_only=True)[0, -1]  # predicts token 0
                model.share_cache_prefix(n_p)
                runner = HookRunner(model.args.n_layers, [hook] if hook else [])
                logits = model(conts.to(device), n_p, key_valid=key_valid.to(device), hooks=runner)  # [b, W, V]
            finally:
                model.free_kv_cache()
            acts = runner.captured.get(hook)  # [b, W, d]
            for b, c in enumerate(part):
                n_c = len(c)
                predicting = torch.cat([first[None], logits[b, : n_c - 1]])  # [n_c, V]
                finish(prompt, c, predicting, acts[b, :n_c] if acts is not None else None)
    return out


def generate(
    session, rows: list[Row], offsets: torch.Tensor, sampling: dict, batch_rows: int, progress=None, keep_error=True
) -> None:
    """Fill each row's continuation; offsets [len(rows), d] (zero rows unsteered). Rows with an SAE `entry`
    (clamp, or add without the error term) run in batches of their own, through the SAE splice."""
    skip = session.steerable.sae.cfg.tokenization.skip_first_positions
    hook = session.steerable.hook_point
    device = session.loaded.model.tok_embeddings.weight.device
    by_vector = [i for i, r in enumerate(rows) if r.entry is None]
    by_entry = [i for i, r in enumerate(rows) if r.entry is not None]
    for group in (by_vector, by_entry):
        # batches of equal size (373 rows: 187 + 186, not 256 + 117): a small last batch runs each decode step
        # at a lower matmul efficiency for the same per-step overheads
        size = -(-len(group) // max(1, -(-len(group) // batch_rows))) if group else 1
        for a in range(0, len(group), size):
            part = group[a : a + size]
            if group is by_vector:  # once per batch, not per token
                splice = vector_splice(offsets[part].to(device), skip)
            else:
                splice = sae_splice(
                    session.steerable.sae, keep_error=keep_error, row_entries=[[rows[i].entry] for i in part]
                )
            done = session.gen.generate([rows[i].tokens for i in part], splice={hook: splice}, **sampling)
            for i, c in zip(part, done):
                rows[i].continuation, rows[i].text = c.tokens, c.text
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
        explicit: bool = False,
        sae_mode: str = "add",
        keep_error: bool = True,
    ):
        """capture: the CaptureOutput that top sentences read sentences 0..capture_sentences-1 from (DiffMean
        reads them there too), or None (the model runs on DiffMean's sentences)."""
        self.session, self.encoder, self.examples, self.meanings = session, encoder, examples, meanings
        self.capture, self.capture_sentences, self.diffmean_source = capture, capture_sentences, ""
        self.explicit = explicit  # the latents were named (--latents): evaluate each, whatever its meaning
        self.sae_mode, self.keep_error = sae_mode, keep_error
        if (sae_mode != "add" or not keep_error) and session.steerable.sae.cfg.normalize == "token":
            raise PipelineInputError(
                "--sae-mode clamp / --no-keep-error: this SAE normalises each token, so a strength in the stream "
                "has no single SAE value; use --sae-mode add"
            )
        self.sae = session.steerable.sae
        self.model = session.loaded.model
        self.instructions = list(select_instructions) + list(test_instructions)
        self.select = list(range(len(select_instructions)))
        self.test = list(range(len(select_instructions), len(self.instructions)))
        self.prompt_tokens = [self.encode_instruction(t) for t in self.instructions]
        self.skip = self.sae.cfg.tokenization.skip_first_positions
        self.norm = residual_norm(self.model, self.sae.cfg.site_hook_point, self.prompt_tokens, self.skip)
        self.judge_model = OfflineJudge(encoder)
        # whole words: a concept word must be one (a fake encoder in tests may have no vocabulary)
        self.known = encoder.whole_words() if hasattr(encoder, "whole_words") else None
        self._words: dict[int, list[str]] = {}

    def encode_instruction(self, text: str) -> list[int]:
        loaded = self.session.loaded
        if loaded.chat_format is not None:
            return loaded.chat_format.encode_dialog([{"role": "user", "content": text}])
        return self.session.text_prompts([text])[0]

    def concept_words(self, latent: int) -> list[str]:
        """The latent's concept: its meaning's concept words that belong together (pipeline/steering/concept.py)."""
        if latent not in self._words:
            words = concept_words(self.meanings[latent], self.known)
            self._words[latent] = related_words(words, self.judge_model.vectors)
        return self._words[latent]

    def output_scores(self, latents: list[int], factor: float, n_wanted: int, progress=None) -> dict:
        """{"concept": [n] gain of the concept tokens, "promoted": [n] gain of the promoted tokens,
        "concept_tokens": per latent ids, "promoted_tokens": [n, 10] ids, "scored": [n] bool}
        (pipeline/steering/output_score.py). Only the latents with concept tokens are steered when at least
        `n_wanted` have them (the others could only fill the list; 70% of the demo's pool): the rest score 0,
        with scored False."""
        prompts = self.session.text_prompts(list(OUTPUT_SCORE_PROMPTS))
        directions = sae_directions(self.sae, latents)
        # every latent's candidate words embedded in one batch, not a few words per latent (10 s of 4,396 calls)
        candidates = [concept_words(self.meanings[lat], self.known) for lat in latents]
        self.judge_model.vectors(list(dict.fromkeys(w for words in candidates if len(words) > 1 for w in words)))
        common = common_words([s["text"] for s in self.examples.sentences.values()])
        tokenizer = self.session.loaded.tokenizer
        concept = [concept_tokens(self.concept_words(lat), tokenizer, common) for lat in latents]
        promoted = promoted_tokens(self.model, directions, 10).cpu()
        scored = torch.tensor([bool(c) for c in concept])
        if int(scored.sum()) < n_wanted:
            scored[:] = True
        if progress is not None:
            progress.total = int(scored.sum()) * len(prompts)
        pick = scored.nonzero().flatten().tolist()
        scores = torch.zeros(2, len(latents))
        scores[:, scored] = output_scores(
            self.model,
            self.sae.cfg.site_hook_point,
            directions[pick],
            prompts,
            factor * self.norm,
            self.skip,
            [[concept[i] for i in pick], promoted[pick].tolist()],
            progress=progress,
        )
        return {
            "concept": scores[0],
            "promoted": scores[1],
            "concept_tokens": concept,
            "promoted_tokens": promoted,
            "scored": scored,
        }

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
                self.capture, self.sae.cfg.site_hook_point, list(ids), tokenization.exclude_first_positions
            )
            self.diffmean_source = str(self.capture.directory)
        else:
            texts = [ex.sentences[s]["text"] for s in ids]
            sums, counts = hook_sums(
                self.model, self.sae.cfg.site_hook_point, tokenization, self.session.loaded.tokenizer, texts
            )
            self.diffmean_source = "model"
        return diffmean_directions(sums, counts, pos, neg)

    def judge(self, rows: list[Row], concepts: dict[int, str]) -> None:
        """Fill rows' scores: the offline judge's (pipeline/steering/judge.py) against each row's latent's
        concept phrase, and the row's latent's mean SAE activation on it."""
        reads = read_continuations(self.model, self.sae, rows)
        items = [
            JudgeItem(concepts[r.latent], self.instructions[r.prompt], r.text, loss)
            for r, (loss, _) in zip(rows, reads)
        ]
        base_loss: dict[int, list[float]] = {}
        for r, (loss, _) in zip(rows, reads):
            if r.method == "none" and math.isfinite(loss):
                base_loss.setdefault(r.prompt, []).append(loss)
        for r, scores, (loss, activation) in zip(rows, self.judge_model.score(items), reads):
            base = mean(base_loss.get(r.prompt, [loss]))
            r.scores = scores | {
                "loss_ratio": loss / base if math.isfinite(loss) and base > 0 else math.nan,
                "repetition": repetition(r.continuation),
                "activation": activation,
            }


def mean(values) -> float:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else math.nan


SCORE_KEYS = (
    "concept",
    "instruction",
    "fluency",
    "harmonic",
    "mentions",
    "similarity",
    "loss",
    "loss_ratio",
    "loop",
    "activation",
)


def share_interval(rows: list[Row], hit, n_boot: int = 1000, seed: int = 0) -> list[float | None]:
    """95% interval of the share of rows with hit(row), resampling the latents (a latent's rows are not
    independent of each other: one that never steers fails on every instruction)."""
    by_latent: dict = {}
    for r in rows:
        by_latent.setdefault(r.latent, []).append(float(hit(r)))
    groups = list(by_latent.values())
    if not groups:
        return [None, None]
    rng = random.Random(seed)
    shares = []
    for _ in range(n_boot):
        pick = [groups[rng.randrange(len(groups))] for _ in groups]
        shares.append(sum(map(sum, pick)) / sum(map(len, pick)))
    shares.sort()
    return [rounded(shares[int(0.025 * n_boot)]), rounded(shares[int(0.975 * n_boot) - 1])]


def summarize_rows(rows: list[Row], intervals: bool = False) -> dict:
    """Means over rows of every judged number; on_concept = share with concept 2 (AxBench's), concept_any =
    share with concept >= 1; with `intervals`, their 95% intervals over latents."""
    out: dict = {"rows": len(rows)}
    out |= {k: rounded(mean(r.scores.get(k) for r in rows)) for k in SCORE_KEYS}
    on = lambda r: r.scores.get("concept", 0) == 2  # noqa: E731
    some = lambda r: r.scores.get("concept", 0) >= 1  # noqa: E731
    out["on_concept"] = rounded(mean(float(on(r)) for r in rows))
    out["concept_any"] = rounded(mean(float(some(r)) for r in rows))
    if intervals:
        out["on_concept_ci"], out["concept_any_ci"] = share_interval(rows, on), share_interval(rows, some)
    rated = [r.scores["claude"] for r in rows if "claude" in r.scores]
    if rated:  # the Claude judge's scores of the same continuations
        out["claude"] = {
            k: rounded(mean(c[k] for c in rated)) for k in ("concept", "instruction", "fluency", "harmonic")
        }
        out["claude"]["on_concept"] = rounded(mean(float(c["concept"] == 2) for c in rated))
        out["claude"]["concept_any"] = rounded(mean(float(c["concept"] >= 1) for c in rated))
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


def best_factor(sweep: list[Row], plain_text: dict[int, str], factors: list[float]) -> float:
    """The factor reported for one (latent, method): the best mean harmonic score, then concept score, on the
    select instructions, among the factors that changed every select continuation (else those that changed
    the most; a factor that leaves the text as it was is "no steering", never the answer to a tie)."""
    by_factor = {f: [r for r in sweep if r.factor == f] for f in factors}
    changed = {f: mean(float(r.text != plain_text[r.prompt]) for r in rows) for f, rows in by_factor.items()}
    most = max(changed.values())
    eligible = [f for f in factors if changed[f] == most] if most > 0 else [max(factors)]
    return max(
        eligible,
        key=lambda f: (
            mean(r.scores["harmonic"] for r in by_factor[f]),
            mean(r.scores["concept"] for r in by_factor[f]),
            -f,
        ),
    )


def row_record(r: Row) -> dict:
    """One continuation in results.json (pipeline/steering/results.py reads it back)."""
    scores = {k: rounded(v) if isinstance(v, float) else v for k, v in r.scores.items()}  # 0-2 scores stay ints
    return {
        "phase": r.phase,
        "prompt": r.prompt,
        "method": r.method,
        "latent": r.latent,
        "factor": r.factor,
        "text": r.text,
        "changed": r.changed,
        **scores,
    }


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
    then also rates every held-out continuation, the unsteered ones against each latent's concept too."""
    bar = progress(len(pool) * len(OUTPUT_SCORE_PROMPTS), "output scores")
    out = bench.output_scores(pool, output_factor, n_candidates, bar)
    if bar is not None:
        bar.close()
    scores, promoted, concept = out["concept"], out["promoted_tokens"], out["concept_tokens"]
    # latents whose meaning names a concept (content words, their tokens no function word) first, by output score;
    # one named by "the punctuation ','" or "the word piece 'g'" has nothing to be judged on-concept for, so the
    # rest (by their promoted tokens' gain) only fill the list when too few do (a tiny model's meanings)
    ranked = sorted(
        range(len(pool)),
        key=lambda i: (not concept[i], -float(scores[i]) if concept[i] else -float(out["promoted"][i]), pool[i]),
    )
    if bench.explicit:  # --latents: every one, in the given order
        ranked = list(range(len(pool)))
    candidates = [pool[i] for i in ranked[:n_candidates]]
    # on the host, both: the SAE's rows come from its device, DiffMean's from host sums; the offsets built from
    # them are stacked here and moved to the model's device per batch (vector_splice)
    directions = {"sae": sae_directions(bench.sae, candidates).cpu(), "diffmean": bench.diffmean(candidates).cpu()}
    phrases = {lat: concept_phrase(bench.concept_words(lat), bench.meanings[lat]) for lat in candidates}
    steered = ("sae", "diffmean")
    d = bench.model.args.dim

    def vector_rows(picks: list[tuple[int, str, float, int]], phase: str) -> tuple[list[Row], list[torch.Tensor]]:
        rows, offsets = [], []
        for i, method, factor, p in picks:
            row = Row(p, method, candidates[i], factor, bench.prompt_tokens[p], phase=phase)
            if method == "sae" and (bench.sae_mode != "add" or not bench.keep_error):
                # the same push in SAE units: add moves the stream by exactly this; clamp sets the activation to it
                strength = add_strength(bench.sae, candidates[i], factor * bench.norm)
                row.entry = SteeringEntry(candidates[i], bench.sae_mode, strength)
                offsets.append(torch.zeros(d))
            else:
                offsets.append(factor * bench.norm * directions[method][i])
            rows.append(row)
        return rows, offsets

    # 1. the sweep on the select instructions (and every instruction unsteered)
    plain = [Row(p, "none", tokens=bench.prompt_tokens[p]) for p in bench.select + bench.test]
    picks = [(i, m, f, p) for i in range(len(candidates)) for m in steered for f in factors for p in bench.select]
    sweep, sweep_offsets = vector_rows(picks, "select")
    rows = plain + sweep
    offsets = torch.stack([torch.zeros(d)] * len(plain) + sweep_offsets)
    bar = progress(len(rows), "steering sweep")
    generate(bench.session, rows, offsets, sampling, batch_rows, bar, bench.keep_error)
    plain_text = {r.prompt: r.text for r in plain}
    # the unsteered text, judged against each latent's concept: the rows steering is compared with
    baseline = [
        Row(r.prompt, "none", lat, None, r.tokens, r.continuation, r.text, phase=phase)
        for lat in candidates
        for r in plain
        for phase in ["select" if r.prompt in bench.select else "test"]
    ]
    bench.judge(baseline + sweep, phrases)
    best = {
        (i, m): best_factor([r for r in sweep if r.latent == lat and r.method == m], plain_text, factors)
        for i, lat in enumerate(candidates)
        for m in steered
    }
    # 2. the test instructions at each (latent, method)'s best factor, and the prompting baseline
    picks = [(i, m, best[(i, m)], p) for i in range(len(candidates)) for m in steered for p in bench.test]
    test, test_offsets = vector_rows(picks, "test")
    for i, lat in enumerate(candidates):
        for p in bench.test:
            text = f"{bench.instructions[p]} In your answer, talk about {phrases[lat]}."
            test.append(Row(p, "prompt", lat, None, bench.encode_instruction(text), phase="test"))
            test_offsets.append(torch.zeros(d))
    if bar is not None:
        bar.total += len(test)
        bar.refresh()
    generate(bench.session, test, torch.stack(test_offsets), sampling, batch_rows, bar, bench.keep_error)
    if bar is not None:
        bar.close()
    bench.judge(test + baseline, phrases)
    for r in sweep + test:
        r.changed = r.text != plain_text[r.prompt]
    held_out = test + [r for r in baseline if r.phase == "test"]
    if claude_judge is not None:
        got = claude_judge(
            [
                {"concept": phrases[r.latent], "instruction": bench.instructions[r.prompt], "response": r.text}
                for r in held_out
            ]
        )
        for k, r in enumerate(held_out):
            if k in got:
                r.scores["claude"] = got[k]
    tokenizer = bench.session.loaded.tokenizer
    latents = []
    for i, lat in enumerate(candidates):
        mine = [r for r in held_out if r.latent == lat]
        entry = {
            "latent": lat,
            "meaning": bench.meanings[lat],
            "concept": phrases[lat],
            "output_score": round(float(scores[ranked[i]]), 5),
            "concept_tokens": [tokenizer.decode([t]) for t in concept[ranked[i]]],
            "promoted_score": round(float(out["promoted"][ranked[i]]), 5),
            "promoted_tokens": [tokenizer.decode([t]) for t in promoted[ranked[i]].tolist()],
            "unsteered": summarize_rows([r for r in mine if r.method == "none"]),
            "methods": {},
        }
        for m in METHODS:
            cell = {"test": summarize_rows([r for r in mine if r.method == m])}
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
    summary = {m: summarize_rows([r for r in test if r.method == m], intervals=True) for m in METHODS}
    summary["unsteered"] = summarize_rows([r for r in held_out if r.method == "none"], intervals=True)
    if claude_judge is not None:
        both = [r for r in held_out if "claude" in r.scores]
        summary["claude_offline_agreement"] = rounded(
            mean(float(r.scores["concept"] == r.scores["claude"]["concept"]) for r in both)
        )
    return {
        "hook_point": bench.sae.cfg.site_hook_point,
        "residual_norm": round(bench.norm, 4),
        "diffmean_activations": bench.diffmean_source,
        "factors": list(factors),
        "output_factor": output_factor,
        "instructions": bench.instructions,
        "select": bench.select,
        "test": bench.test,
        "latents": latents,
        "summary": summary,
        "rows": [row_record(r) for r in baseline + sweep + test],
        "output_scores": {str(lat): round(float(s), 5) for lat, s, c in zip(pool, scores.tolist(), concept) if c},
        "promoted_scores": {
            str(lat): round(float(s), 5) for lat, s, ok in zip(pool, out["promoted"].tolist(), out["scored"]) if ok
        },
    }
