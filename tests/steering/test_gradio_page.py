"""The Gradio steering page in a real browser: Debian's chromium (installed by scripts/install.sh --test),
driven by Selenium through Debian's chromedriver; no browser is downloaded by a test tool.

The page's two outputs must equal what the same session generates directly (unsteered and steered),
its search must find a latent by meaning, and its inspection table must list the steered latent.
A screenshot is saved as a test artifact (test-artifacts/ or $TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from llama_3 import load_model
from pipeline.core.manifest import make_manifest, write_json_atomic
from pipeline.sae.formats import sae_sha256
from pipeline.sae.model import SaeConfig, TopKSae
from pipeline.steering.session import Session
from pipeline.steering.splice import SteeringEntry

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LATENT, STRENGTH, PROMPTS = 5, 30.0, ["hello there", "a b c"]
STEERABLE, RECOMMENDED = 9, 12.5  # the one latent a (hand-written) steering evaluation of the SAE recommends

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tiny, tmp_path_factory):
    from llama_3_inference_text_completion_gradio import GradioConfig, main

    root = tmp_path_factory.mktemp("gradio")
    lm = load_model(tiny.hf_dir)
    torch.manual_seed(2)
    TopKSae(
        SaeConfig(
            d_model=lm.args.dim,
            n_latents=32,
            k=4,
            hook_point="resid_pre.1",
            model=lm.identity(),
            exclude_first_positions=1,
        )
    ).save(root / "sae")
    (root / "m").mkdir()
    (root / "m" / "run.json").write_text(
        json.dumps(
            {
                "sae_sha256": sae_sha256(root / "sae"),
                "explainer": "test",
                "latents": [
                    {
                        "latent": LATENT,
                        "meaning": 'the tokens "greetings", "salutations"',
                        "certainty": 0.9,
                        "score": 0.8,
                    },
                    {"latent": STEERABLE, "meaning": "farewells", "certainty": 0.1, "score": 0.2},
                ],
            }
        )
    )
    (root / "eval").mkdir()  # what steering_evaluation.py writes, reduced to what the page reads
    manifest = make_manifest("steering_eval", config={}, inputs={"sae_sha256": sae_sha256(root / "sae")}, counts={})
    write_json_atomic(root / "eval" / "manifest.json", manifest)
    sae_cell = {"add_strength": RECOMMENDED, "test": {"harmonic": 1.2}}
    (root / "eval" / "results.json").write_text(
        json.dumps(
            {
                "hook_point": "resid_pre.1",
                "summary": {},
                "instructions": [],
                "rows": [],
                "output_scores": {str(LATENT): 0.01, str(STEERABLE): 0.4},
                "latents": [{"latent": STEERABLE, "methods": {"sae": sae_cell}}],
            }
        )
    )
    cfg = GradioConfig(
        sae=str(root / "sae"),
        meanings=str(root / "m"),
        steering_eval=str(root / "eval"),
        model=str(tiny.hf_dir),
        device="cpu",
        dtype="float32",
        port=free_port(),
        inspect_top=3,
    )
    app = main(cfg, block=False)
    yield app, cfg
    app.close()


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: run `bash scripts/install.sh --test` (Debian packages chromium, "
            "chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    # The flags that keep Chromium from phoning home (it would fail, loudly, on a closed network).
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1700",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def click_centered(d, element) -> None:
    """Click a table cell scrolled to the middle of the view (the sticky header row covers one at its top)."""
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def test_page_steers_and_shows_both_outputs(page, browser, tiny):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    app, cfg = page
    assert app.local_url.startswith("http://127.0.0.1:")  # bound to loopback by default
    d, wait = browser, WebDriverWait(browser, 60)
    d.get(f"http://127.0.0.1:{cfg.port}/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))

    def text_of(sel):
        return d.find_element(By.CSS_SELECTOR, sel).text

    def fill(sel, value):
        box = d.find_element(By.CSS_SELECTOR, sel)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(value)

    # the page starts on an entry that steers: the evaluation's best latent at its recommended `add` strength
    assert d.find_element(By.CSS_SELECTOR, "#latent input").get_attribute("value") == str(STEERABLE)
    assert d.find_element(By.CSS_SELECTOR, "#strength input").get_attribute("value") == str(RECOMMENDED)
    assert d.find_element(By.XPATH, "//*[@id='mode']//input[@value='add']").is_selected()
    # search by meaning, then pick the hit: the latent box takes its id
    fill("#search_query textarea, #search_query input", "salutations")
    d.find_element(By.CSS_SELECTOR, "#search_button").click()
    wait.until(lambda d: '"greetings", "salutations"' in text_of("#search_results"))
    # beside the input meaning, the output effect: the top tokens of the decoder row's logit lens
    from pipeline.steering.output_score import promoted_tokens
    from pipeline.steering.vectors import sae_directions

    probe = Session.open(cfg.model, cfg.sae, cfg.meanings, "cpu", "float32")
    ids = promoted_tokens(probe.loaded.model, sae_directions(probe.steerable.sae, [LATENT]), 5)[0].tolist()
    effect = " ".join(repr(probe.loaded.tokenizer.decode([t])) for t in ids)
    lines = text_of("#search_results").splitlines()
    at = next(i for i, line in enumerate(lines) if "salutations" in line)
    assert lines[at - 1].strip() == str(LATENT)  # the columns: latent, meaning, promotes, then the numbers
    assert lines[at + 1].split() == effect.split()
    fill("#latent input", "0")
    hits = d.find_elements(By.XPATH, f"//*[@id='search_results']//*[normalize-space(text())='{LATENT}']")
    click_centered(d, next(h for h in hits if h.is_displayed()))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#latent input").get_attribute("value") == str(LATENT))

    d.find_element(By.XPATH, "//*[@id='mode']//label[normalize-space(.)='clamp']").click()
    fill("#strength input", str(STRENGTH))
    d.find_element(By.CSS_SELECTOR, "#add_entry").click()
    wait.until(lambda d: "salutations" in text_of("#entries"))
    fill("#prompts textarea", "\n".join(PROMPTS))
    d.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: "greetings" in text_of("#inspection"))

    plain = d.find_element(By.CSS_SELECTOR, "#out_unsteered textarea").get_attribute("value")
    steered = d.find_element(By.CSS_SELECTOR, "#out_steered textarea").get_attribute("value")
    artifacts = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(artifacts / "gradio_steering_page.png"))

    # the same request made directly must give the same two texts
    session = Session.open(cfg.model, cfg.sae, cfg.meanings, "cpu", "float32")
    tokens = [session.loaded.tokenizer.encode(p) for p in PROMPTS]
    pairs = session.complete(tokens, [SteeringEntry(LATENT, "clamp", STRENGTH)], max_new_tokens=32, temperature=0)
    expected_plain = "\n\n".join(f"[{i + 1}] {p}{a.text}" for i, (p, (a, _)) in enumerate(zip(PROMPTS, pairs)))
    expected_steered = "\n\n".join(f"[{i + 1}] {p}{b.text}" for i, (p, (_, b)) in enumerate(zip(PROMPTS, pairs)))
    assert plain == expected_plain and steered == expected_steered
    assert plain != steered

    # the judge table: the evaluation's offline judge on both texts against the latent's concept, unsteered -> steered
    from pipeline.interpret.embedding import SentenceEncoder
    from pipeline.steering.evaluation import Row, read_continuations
    from pipeline.steering.judge import JudgeItem, OfflineJudge

    wait.until(lambda d: re.search(r"\d -> \d", text_of("#judge")))  # a row, not the "->" of the label
    rows = [Row(0, "x", LATENT, None, c.prompt_tokens, c.tokens) for pair in pairs for c in pair]
    reads = read_continuations(session.loaded.model, session.steerable.sae, rows)
    items = [JudgeItem("greetings, salutations", PROMPTS[0], c.text, reads[k][0]) for k, c in enumerate(pairs[0])]
    plain_scores, steered_scores = OfflineJudge(SentenceEncoder()).score(items)
    judged = text_of("#judge")
    assert "greetings, salutations" in judged  # the concept words of the meaning, not "the tokens ..."
    for key in ("concept", "instruction", "fluency"):
        assert f"{plain_scores[key]} -> {steered_scores[key]}" in judged
    assert f"{plain_scores['harmonic']:.2f} -> {steered_scores['harmonic']:.2f}" in judged
    assert f"{reads[0][1]:.2f} -> {reads[1][1]:.2f}" in judged

    # sorted by steerability, the evaluation's best latent comes first; picking it sets `add` at its strength
    fill("#search_query textarea, #search_query input", "")
    d.find_element(By.XPATH, "//*[@id='sort_by']//label[normalize-space(.)='steerability']").click()
    wait.until(lambda d: text_of("#search_results").split("farewells")[0].count("greetings") == 0)
    hits = d.find_elements(By.XPATH, f"//*[@id='search_results']//*[normalize-space(text())='{STEERABLE}']")
    click_centered(d, next(h for h in hits if h.is_displayed()))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#strength input").get_attribute("value") == str(RECOMMENDED))
    assert d.find_element(By.CSS_SELECTOR, "#latent input").get_attribute("value") == str(STEERABLE)
    assert d.find_element(By.XPATH, "//*[@id='mode']//input[@value='add']").is_selected()
