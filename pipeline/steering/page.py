"""What the steering web page does, without its widgets (llama_3_inference_text_completion_gradio.py lays them
out): find latents by meaning, pick one at its recommended strength, keep a list of steering entries, and
generate unsteered and steered text side by side with each token's latents and the steering evaluation's
judge on both. Bad input raises PipelineInputError; the page shows its line."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from llama_3.errors import PipelineInputError
from llama_3.generation import check_splice_on
from pipeline.interpret.embedding import SentenceEncoder
from pipeline.steering.concept import concept_phrase, concept_words, related_words
from pipeline.steering.evaluation import Row, read_continuations
from pipeline.steering.judge import JudgeItem, OfflineJudge
from pipeline.steering.output_score import promoted_tokens
from pipeline.steering.results import open_for_sae
from pipeline.steering.session import Session
from pipeline.steering.splice import SteeringEntry, check_entries
from pipeline.steering.vectors import sae_directions


def rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def format_outputs(labels: list[str], texts: list[str]) -> str:
    if len(labels) == 1:
        return texts[0]
    return "\n\n".join(f"[{i + 1}] {label}{text}" for i, (label, text) in enumerate(zip(labels, texts)))


@dataclass
class Generated:
    """One update of a generation: the texts so far, and at the end the inspection and judge rows."""

    unsteered: str
    steered: str
    inspection: list[list] | None = None
    """Per steered token: prompt, position, token, its top latents (activation) with their meanings."""
    judged: list[list] | None = None
    """Per prompt: the offline judge's scores and the first entry's latent on the text, unsteered -> steered."""


class SteeringPage:
    def __init__(
        self, session: Session, steering_eval: str, max_prompts: int, max_new_tokens_limit: int, inspect_top: int
    ):
        if session.steerable is None:
            raise PipelineInputError("the steering page needs --sae")
        self.session, self.steerable = session, session.steerable
        self.max_prompts, self.max_new_tokens_limit, self.inspect_top = max_prompts, max_new_tokens_limit, inspect_top
        results = open_for_sae(steering_eval, self.steerable.sae.sha256)
        self.output_scores = results.output_scores if results else {}
        self.recommended = results.recommended() if results else {}
        self._judge: OfflineJudge | None = None  # MiniLM, loaded on the first judged generation
        # the evaluation's most on-concept SAE latent (then harmonic), at its recommended `add` strength
        steered = [r for r in (results.latents if results else []) if r["latent"] in self.recommended]
        top = max(
            steered,
            key=lambda r: (r["methods"]["sae"]["test"].get("on_concept") or 0, r["methods"]["sae"]["test"]["harmonic"]),
            default=None,
        )
        self.best = (top["latent"], "add", round(self.recommended[top["latent"]], 3)) if top else None

    def promotes(self, latents: list[int]) -> list[str]:
        """The output effect beside the input meaning: the top tokens of each decoder row's logit lens."""
        if not latents:
            return []
        lm = self.session.loaded
        ids = promoted_tokens(lm.model, sae_directions(self.steerable.sae, latents), 5).tolist()
        return [" ".join(repr(lm.tokenizer.decode([t])) for t in row) for row in ids]

    def search(self, query: str, sort_by: str = "score") -> list[list]:
        """Latents whose meaning matches: latent, meaning, promoted tokens, detection score, output score,
        recommended add (at most 50)."""
        hits = self.steerable.search(query or "", limit=self.steerable.sae.cfg.n_latents)
        scores = self.output_scores
        if sort_by == "steerability":  # output score first; latents the evaluation never scored last
            hits.sort(key=lambda h: (h["latent"] not in scores, -scores.get(h["latent"], 0.0)))
        hits = hits[:50]
        return [  # what a latent means and does first (the page shows these without scrolling sideways)
            [
                h["latent"],
                h.get("meaning", ""),
                effect,
                rounded(h.get("score"), 3),
                rounded(scores.get(h["latent"]), 4),
                rounded(self.recommended.get(h["latent"]), 3),
            ]
            for h, effect in zip(hits, self.promotes([h["latent"] for h in hits]))
        ]

    def entries_table(self, entries: list[SteeringEntry]) -> list[list]:
        return [[e.latent, e.mode, e.strength, self.steerable.meaning(e.latent)] for e in entries]

    def add_entry(self, latent, mode, strength, entries: list[SteeringEntry]) -> list[SteeringEntry]:
        """The entries with this one added (replacing one of the same latent and mode)."""
        try:
            entry = SteeringEntry(int(latent), str(mode), float(strength))
        except (TypeError, ValueError) as e:
            raise PipelineInputError(str(e)) from None
        check_entries(self.steerable.sae, [entry])
        return [e for e in entries if e.latent != entry.latent or e.mode != entry.mode] + [entry]

    def default_entry(self) -> tuple[int, str, float]:
        """The entry the page starts with: the evaluation's most on-concept SAE latent at its recommended `add`
        strength; without an evaluation, the best-explained latent clamped high."""
        if self.best is not None:
            return self.best
        best = self.steerable.best_latents(1)
        return (best[0] if best else 0), "clamp", 8.0

    def judge(self, pairs, entries: list[SteeringEntry], labels: list[str]) -> list[list]:
        """Per prompt, unsteered -> steered: the steering evaluation's offline judge (concept, instruction,
        fluency 0-2 and their harmonic mean; pipeline/steering/judge.py) against the first entry's latent's
        concept, and that latent's mean activation on the re-read text."""
        if not entries or not pairs or pairs[0][0] is None:
            return []
        latent = entries[0].latent
        rows = [
            Row(i, m, latent, None, c.prompt_tokens, c.tokens)
            for i, pair in enumerate(pairs)
            for m, c in zip(("none", "steered"), pair)
        ]
        reads = read_continuations(self.session.loaded.model, self.steerable.sae, rows)
        meaning, concept = self.steerable.meaning(latent), ""
        scores: list[dict | None] = [None] * len(rows)
        if meaning:
            try:
                self._judge = self._judge or OfflineJudge(SentenceEncoder())
                words = concept_words(meaning, self._judge.encoder.whole_words())
                concept = concept_phrase(related_words(words, self._judge.vectors), meaning)  # as the evaluation
                items = [
                    JudgeItem(concept, labels[i], c.text, reads[2 * i + k][0])
                    for i, pair in enumerate(pairs)
                    for k, c in enumerate(pair)
                ]
                scores = self._judge.score(items)
            except PipelineInputError:  # the offline judge's package is not installed: no scores
                pass

        def arrow(a, b, digits: int = 0) -> str:
            return "" if a is None or b is None else f"{a:.{digits}f} -> {b:.{digits}f}"

        def score(i: int, key: str, digits: int = 0) -> str:
            a, b = scores[2 * i], scores[2 * i + 1]
            return "" if a is None or b is None else arrow(a[key], b[key], digits)

        return [
            [
                i + 1,
                latent,
                concept,
                score(i, "concept"),
                score(i, "instruction"),
                score(i, "fluency"),
                score(i, "harmonic", 2),
                arrow(reads[2 * i][1], reads[2 * i + 1][1], 2),
            ]
            for i in range(len(pairs))
        ]

    def generate(
        self,
        prompts_text: str,
        entries: list[SteeringEntry],
        greedy: bool,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        steer_on: str,
        keep_error: bool,
    ) -> Iterator[Generated]:
        """Unsteered and steered continuations of every prompt (one per line) as they grow, then the
        inspection of every steered token and the judgement."""
        labels = [line for line in (prompts_text or "").splitlines() if line.strip()]
        if not labels:
            raise PipelineInputError("write at least one prompt (one per line)")
        if len(labels) > self.max_prompts:
            raise PipelineInputError(f"at most {self.max_prompts} prompts per request")
        check_splice_on(steer_on)
        session = self.session
        prompts = session.text_prompts(labels)
        sampling = {
            "max_new_tokens": max(1, min(int(max_new_tokens), self.max_new_tokens_limit)),
            "temperature": 0.0 if greedy else float(temperature),
            "top_p": float(top_p),
            "seed": int(seed),
        }
        pairs = []
        for pairs in session.stream(
            prompts, list(entries), keep_error=bool(keep_error), compare=True, steer_on=steer_on, **sampling
        ):
            plain = [p.text if p is not None else s.text for p, s in pairs]
            yield Generated(format_outputs(labels, plain), format_outputs(labels, [s.text for _, s in pairs]))
        rows = []
        for i, (_, steered) in enumerate(pairs):
            for position, item in enumerate(session.inspect(steered, list(entries), steer_on, self.inspect_top)):
                latents = "; ".join(
                    f"{x['latent']} ({x['activation']:.2f}) {x['meaning']}".strip() for x in item["latents"]
                )
                rows.append([i + 1, position, item["token"], latents])
        yield Generated("", "", rows, self.judge(pairs, list(entries), labels))
