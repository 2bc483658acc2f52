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
from llama_3.generation import SPLICE_ON  # noqa: E402
from pipeline.core.cli import Dtype, check_choices, parse_config, run_main  # noqa: E402
from pipeline.core.layout import MEANINGS_DIR, SAE_WEIGHTS_DIR, STEERING_EVAL_DIR  # noqa: E402
from pipeline.steering.page import SteeringPage  # noqa: E402
from pipeline.steering.session import Session  # noqa: E402
from pipeline.steering.splice import MODES, SteeringEntry  # noqa: E402

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


def build_app(session: Session, cfg: GradioConfig) -> gr.Blocks:
    """The widgets and their wiring; what each event does is SteeringPage's (pipeline/steering/page.py)."""
    page = SteeringPage(session, cfg.steering_eval, cfg.max_prompts, cfg.max_new_tokens_limit, cfg.inspect_top)
    steerable = page.steerable
    n_latents = steerable.sae.cfg.n_latents

    def pick(evt: gr.SelectData, table):
        """The latent box takes the clicked latent; where the sweep recommends a strength, `add` at it."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            latent = int(table.iloc[row, 0])  # the first column: latent
        except (AttributeError, IndexError, ValueError, TypeError):
            return gr.update(), gr.update(), gr.update()
        if latent in page.recommended:
            return latent, "add", round(page.recommended[latent], 3)
        return latent, gr.update(), gr.update()

    def add_entry(latent, mode, strength, entries: list[SteeringEntry]):
        try:
            entries = page.add_entry(latent, mode, strength, entries)
        except PipelineInputError as e:
            raise gr.Error(str(e)) from None
        return entries, page.entries_table(entries)

    def generate(*args):
        try:
            for update in page.generate(*args):
                if update.inspection is None:
                    yield update.unsteered, update.steered, gr.update(), gr.update()
                else:
                    yield gr.update(), gr.update(), update.inspection, update.judged
        except PipelineInputError as e:
            raise gr.Error(str(e)) from None

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
                    label="Prompts (one per line)",
                    lines=4,
                    value="My favourite place in the city is",
                    elem_id="prompts",
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
            with gr.Column(scale=3):
                query = gr.Textbox(label="Find latents by meaning", placeholder="e.g. bone", elem_id="search_query")
                with gr.Row():
                    sort_by = gr.Radio(
                        ["score", "steerability"],
                        value="score",
                        label="Sort by (steerability: output score from the steering evaluation)",
                        elem_id="sort_by",
                    )
                    search_btn = gr.Button("Search", elem_id="search_button")
                hits = gr.Dataframe(  # what a latent means and does first: visible without scrolling sideways
                    headers=["latent", "meaning", "promotes", "detection", "output score", "recommended add"],
                    interactive=False,
                    wrap=True,
                    column_widths=["9%", "38%", "27%", "9%", "8%", "9%"],
                    max_height=320,
                    elem_id="search_results",
                )
        first_latent, first_mode, first_strength = page.default_entry()  # one that steers, from the evaluation
        with gr.Row():
            latent = gr.Number(
                label=f"Latent (0..{n_latents - 1}; click a search result)",
                precision=0,
                value=first_latent,
                elem_id="latent",
            )
            mode = gr.Radio(list(MODES), value=first_mode, label="Mode", elem_id="mode")
            strength = gr.Number(label="Strength", value=first_strength, elem_id="strength")
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
                "concept judged",
                "concept 0-2",
                "instruction 0-2",
                "fluency 0-2",
                "harmonic",
                "its activation",
            ],
            interactive=False,
            wrap=True,
            elem_id="judge",
            label="What the steering did, unsteered -> steered (the steering evaluation's offline judge)",
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

        search_btn.click(page.search, [query, sort_by], hits)
        query.submit(page.search, [query, sort_by], hits)
        sort_by.change(page.search, [query, sort_by], hits)
        hits.select(pick, hits, [latent, mode, strength])
        add_btn.click(add_entry, [latent, mode, strength, entries_state], [entries_state, entries_view])
        clear_btn.click(lambda: ([], []), None, [entries_state, entries_view])
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
    if block:  # our line, not Gradio's "set `share=True` in `launch()`": this page's switch is a flag
        print(f"steering page: http://{cfg.host}:{cfg.port}" + ("" if cfg.share else "  (--share: a public link)"))
    app.launch(
        server_name=cfg.host,
        server_port=cfg.port,
        share=cfg.share,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=True,
    )
    return app


if __name__ == "__main__":
    run_main(main, parse_config(GradioConfig, sys.argv[1:], __doc__))
