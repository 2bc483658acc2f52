"""A web page for steered text completion: prompts, sampling, latent search, steering entries,
steered and unsteered output streamed side by side, and the latents active on every generated token.

Usage:
    # CPU, the demo run: SAE from sae_training.py, meanings from latent_index_meaning/
    python llama_3_inference_text_completion_gradio.py            # then open http://127.0.0.1:7860
    # one GPU, a Llama 3.x SAE; --share asks Gradio for a public link (off by default)
    python llama_3_inference_text_completion_gradio.py --sae runs/sae/sae --device cuda --port 7861

The page binds to 127.0.0.1 unless --host says otherwise. Everything it loads (model, SAE,
meanings) is named on this command line; the browser sends only prompts, numbers and choices.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from a research tool by default
import gradio as gr  # noqa: E402

from llama_3.errors import PipelineInputError  # noqa: E402
from llama_3.generation import SPLICE_ON, check_splice_on  # noqa: E402
from pipeline.core.cli import Dtype, check_choices, parse_config, run_main  # noqa: E402
from pipeline.core.layout import MEANINGS_DIR, SAE_WEIGHTS_DIR, STEERING_EVAL_DIR  # noqa: E402
from pipeline.interpret.embedding import SentenceEncoder
from pipeline.steering.evaluation import Row, concept_phrase, read_continuations  # noqa: E402
from pipeline.steering.output_score import promoted_tokens  # noqa: E402
from pipeline.steering.results import open_for_sae  # noqa: E402
from pipeline.steering.session import Session  # noqa: E402
from pipeline.steering.splice import MODES, SteeringEntry, check_entries  # noqa: E402
from pipeline.steering.vectors import sae_directions  # noqa: E402

TITLE = "SAE steering"


@dataclass
class GradioConfig:
    sae: str = str(SAE_WEIGHTS_DIR)
    """SAE folder (sae.safetensors + cfg.json)."""
    meanings: str = str(MEANINGS_DIR)
    """Folder of latent meanings."""
    steering_eval: str = str(STEERING_EVAL_DIR)
    """This SAE's steering evaluation: output scores, recommended strengths (optional)."""
    model: str | None = None
    """Default: the SAE's model."""
    device: str = "auto"
    """auto, cpu, cuda."""
    dtype: Dtype = "auto"
    """auto, float32, bfloat16, float16."""
    host: str = "127.0.0.1"
    """Interface to bind (0.0.0.0 exposes the page to your network)."""
    port: int = 7860
    """Port."""
    share: bool = False
    """Ask Gradio for a public share link."""
    max_prompts: int = 8
    """Most prompts per request."""
    max_new_tokens_limit: int = 256
    """Upper end of the max-new-tokens slider."""
    inspect_top: int = 5
    """Latents shown per generated token."""

    def __post_init__(self) -> None:
        check_choices(self)


def entries_table(entries: list[SteeringEntry], session: Session) -> list[list]:
    return [[e.latent, e.mode, e.strength, session.steerable.meaning(e.latent)] for e in entries]


def format_outputs(labels: list[str], texts: list[str]) -> str:
    if len(labels) == 1:
        return texts[0]
    return "\n\n".join(f"[{i + 1}] {label}{text}" for i, (label, text) in enumerate(zip(labels, texts)))


def build_app(session: Session, cfg: GradioConfig) -> gr.Blocks:
    if session.steerable is None:
        raise PipelineInputError("the Gradio page needs --sae")
    steerable = session.steerable
    n_latents = steerable.sae.cfg.n_latents

    results = open_for_sae(cfg.steering_eval, steerable.sae.sha256)
    output_scores = results.output_scores if results else {}
    recommended = results.recommended() if results else {}

    def promotes(latents: list[int]) -> list[str]:
        """The output effect beside the input meaning: the top tokens of each decoder row's logit lens."""
        if not latents:
            return []
        ids = promoted_tokens(session.loaded.model, sae_directions(steerable.sae, latents), 5).tolist()
        return [" ".join(repr(session.loaded.tokenizer.decode([t])) for t in row) for row in ids]

    def search(query: str, sort_by: str = "certainty"):
        hits = steerable.search(query or "", limit=n_latents)
        if sort_by == "steerability":  # output score first; latents the evaluation never scored last
            hits.sort(key=lambda h: (h["latent"] not in output_scores, -output_scores.get(h["latent"], 0.0)))
        hits = hits[:50]
        return [
            [
                h["latent"],
                h.get("certainty"),
                h.get("score"),
                output_scores.get(h["latent"]),
                recommended.get(h["latent"]),
                h.get("meaning", ""),
                effect,
            ]
            for h, effect in zip(hits, promotes([h["latent"] for h in hits]))
        ]

    def pick(evt: gr.SelectData, table):
        """The latent box takes the clicked latent; where the sweep recommends a strength, `add` at it."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            latent = int(table.iloc[row, 0])
        except (AttributeError, IndexError, ValueError, TypeError):
            return gr.update(), gr.update(), gr.update()
        if latent in recommended:
            return latent, "add", round(recommended[latent], 3)
        return latent, gr.update(), gr.update()

    encoder = []  # MiniLM, loaded on the first judged generation

    def judge(pairs, entries: list[SteeringEntry]) -> list[list]:
        """Per prompt: the first entry's latent on the re-read text, the clean model's loss per token, and
        the similarity to the latent's concept (its meaning's key words), unsteered -> steered."""
        if not entries or not pairs or pairs[0][0] is None:
            return []
        latent = entries[0].latent
        rows = [
            Row(i, m, latent, None, c.prompt_tokens, c.tokens)
            for i, pair in enumerate(pairs)
            for m, c in zip(("none", "steered"), pair)
        ]
        reads = read_continuations(session.loaded.model, steerable.sae, rows)
        meaning = steerable.meaning(latent)
        sims = [None] * len(rows)
        if meaning:
            try:
                if not encoder:
                    encoder.append(SentenceEncoder())
                concept = concept_phrase(meaning)  # what the evaluation's judge embeds, not "the tokens ..."
                vectors = encoder[0].encode([concept] + [c.text for pair in pairs for c in pair])
                sims = (vectors[1:] @ vectors[0]).tolist()
            except PipelineInputError:  # the offline judge's package is not installed: no similarity column
                pass

        def arrow(a, b, digits=3):
            return "" if a is None or b is None else f"{a:.{digits}f} -> {b:.{digits}f}"

        return [
            [
                i + 1,
                latent,
                arrow(reads[2 * i][1], reads[2 * i + 1][1]),
                arrow(reads[2 * i][0], reads[2 * i + 1][0], 2),
                arrow(sims[2 * i], sims[2 * i + 1]),
            ]
            for i in range(len(pairs))
        ]

    def add_entry(latent, mode, strength, entries: list[SteeringEntry]):
        try:
            entry = SteeringEntry(int(latent), str(mode), float(strength))
            check_entries(steerable.sae, [entry])
        except (PipelineInputError, TypeError, ValueError) as e:
            raise gr.Error(str(e)) from None
        entries = [e for e in entries if e.latent != entry.latent or e.mode != entry.mode] + [entry]
        return entries, entries_table(entries, session)

    def clear_entries():
        return [], []

    def generate(
        prompts_text: str,
        entries: list[SteeringEntry],
        greedy: bool,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        steer_on: str,
        keep_error: bool,
    ):
        labels = [line for line in (prompts_text or "").splitlines() if line.strip()]
        if not labels:
            raise gr.Error("write at least one prompt (one per line)")
        if len(labels) > cfg.max_prompts:
            raise gr.Error(f"at most {cfg.max_prompts} prompts per request")
        try:
            check_splice_on(steer_on)
        except PipelineInputError as e:
            raise gr.Error(str(e)) from None
        prompts = session.text_prompts(labels)
        sampling = {
            "max_new_tokens": max(1, min(int(max_new_tokens), cfg.max_new_tokens_limit)),
            "temperature": 0.0 if greedy else float(temperature),
            "top_p": float(top_p),
            "seed": int(seed),
        }
        pairs = []
        for pairs in session.stream(
            prompts, list(entries), keep_error=bool(keep_error), compare=True, steer_on=steer_on, **sampling
        ):
            plain = [p.text if p is not None else s.text for p, s in pairs]
            yield (
                format_outputs(labels, plain),
                format_outputs(labels, [s.text for _, s in pairs]),
                gr.update(),
                gr.update(),
            )
        rows = []
        for i, (_, steered) in enumerate(pairs):
            for position, item in enumerate(session.inspect(steered, list(entries), steer_on, cfg.inspect_top)):
                latents = "; ".join(
                    f"{x['latent']} ({x['activation']:.2f}) {x['meaning']}".strip() for x in item["latents"]
                )
                rows.append([i + 1, position, item["token"], latents])
        yield gr.update(), gr.update(), rows, judge(pairs, list(entries))

    sae_name = Path(steerable.directory).resolve().name
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(
            f"## {TITLE}\nModel `{Path(str(session.loaded.path)).name}` · SAE `{sae_name}` at `{steerable.hook_point}` "
            f"({n_latents} latents, k {steerable.sae.cfg.k}) · {len(steerable.meanings)} latents with meanings"
        )
        entries_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                prompts = gr.Textbox(
                    label="Prompts (one per line)", lines=4, value="My favourite food is", elem_id="prompts"
                )
                with gr.Row():
                    greedy = gr.Checkbox(label="Greedy", value=True, elem_id="greedy")
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    max_new = gr.Slider(
                        1, cfg.max_new_tokens_limit, value=32, step=1, label="Max new tokens", elem_id="max_new_tokens"
                    )
                    seed = gr.Number(value=0, precision=0, label="Seed")
                with gr.Row():
                    steer_on = gr.Radio(list(SPLICE_ON), value="all", label="Steer on")
                    keep_error = gr.Checkbox(label="Keep the SAE error term (off: pure reconstruction)", value=True)
            with gr.Column(scale=2):
                query = gr.Textbox(label="Find latents by meaning", placeholder="e.g. bone", elem_id="search_query")
                with gr.Row():
                    sort_by = gr.Radio(
                        ["certainty", "steerability"],
                        value="certainty",
                        label="Sort by (steerability: output score from the steering evaluation)",
                        elem_id="sort_by",
                    )
                    search_btn = gr.Button("Search", elem_id="search_button")
                hits = gr.Dataframe(
                    headers=["latent", "certainty", "score", "output score", "recommended add", "meaning", "promotes"],
                    interactive=False,
                    max_height=240,
                    elem_id="search_results",
                )
        with gr.Row():
            latent = gr.Number(
                label=f"Latent (0..{n_latents - 1}; click a search result)", precision=0, value=0, elem_id="latent"
            )
            mode = gr.Radio(list(MODES), value="clamp", label="Mode", elem_id="mode")
            strength = gr.Number(label="Strength", value=8.0, elem_id="strength")
            add_btn = gr.Button("Add steering entry", elem_id="add_entry")
            clear_btn = gr.Button("Clear entries")
        entries_view = gr.Dataframe(
            headers=["latent", "mode", "strength", "meaning"], interactive=False, elem_id="entries"
        )
        run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        judged = gr.Dataframe(
            headers=[
                "prompt",
                "latent (first entry)",
                "its activation on the text",
                "clean model's loss per token",
                "similarity to its meaning (MiniLM)",
            ],
            interactive=False,
            elem_id="judge",
            label="What the steering did, unsteered -> steered",
        )
        with gr.Row():
            out_plain = gr.Textbox(label="Unsteered", lines=8, elem_id="out_unsteered")
            out_steered = gr.Textbox(label="Steered", lines=8, elem_id="out_steered")
        inspection = gr.Dataframe(
            headers=["prompt", "position", "token", f"top {cfg.inspect_top} latents (activation) meaning"],
            interactive=False,
            max_height=400,
            elem_id="inspection",
            label="Latents on each steered token",
        )

        search_btn.click(search, [query, sort_by], hits)
        query.submit(search, [query, sort_by], hits)
        sort_by.change(search, [query, sort_by], hits)
        hits.select(pick, hits, [latent, mode, strength])
        add_btn.click(add_entry, [latent, mode, strength, entries_state], [entries_state, entries_view])
        clear_btn.click(clear_entries, None, [entries_state, entries_view])
        run_btn.click(
            generate,
            [prompts, entries_state, greedy, temperature, top_p, max_new, seed, steer_on, keep_error],
            [out_plain, out_steered, inspection, judged],
        )
    return app


def main(cfg: GradioConfig, block: bool = True) -> gr.Blocks:
    session = Session.open(cfg.model, cfg.sae, cfg.meanings, cfg.device, cfg.dtype)
    app = build_app(session, cfg)
    app.queue(default_concurrency_limit=1)  # one model: requests take turns
    app.launch(
        server_name=cfg.host,
        server_port=cfg.port,
        share=cfg.share,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
    )
    return app


if __name__ == "__main__":
    run_main(main, parse_config(GradioConfig, sys.argv[1:], __doc__))
