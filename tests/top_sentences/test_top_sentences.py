"""Top sentences per latent: brute-force equality, deterministic ties, ranks merge, HTML browser, bad input."""

from __future__ import annotations

import collections
import html
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from capture_top_activating_sentences import main as top_main
from llama_3 import PipelineInputError, load_model
from openwebtext_sentences_dataset import main as sentences_main
from pipeline.report.feature_browser import write_browser
from pipeline.sae.formats import sae_sha256
from pipeline.sae.model import SaeConfig, TopKSae
from pipeline.sentences.config import SentencesConfig
from pipeline.sentences.dataset import iter_sentences
from pipeline.top_sentences.config import TopSentencesConfig
from pipeline.top_sentences.hard_negatives import KEY_TOKEN_RANKS
from pipeline.top_sentences.tables import AGGREGATIONS, TopTable, merge_top, open_top_sentences
from tests.collective_log import assert_ranks_agree, collective_env

REPO = Path(__file__).resolve().parents[2]
HOOK, N_LATENTS, K, TOP_N = "resid_pre.1", 40, 4, 5
SAMPLED, HARD = 7, 4  # activating sentences sampled and hard negatives per latent


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    out = tmp_path_factory.mktemp("sent") / "s"
    sentences_main(
        SentencesConfig(
            out=str(out), max_documents=40, row_group_sentences=24, splitter="trained", punkt_train_chars=200_000
        )
    )
    return out


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny):
    lm = load_model(tiny.hf_dir)
    torch.manual_seed(0)
    sae = TopKSae(
        SaeConfig(
            d_model=lm.args.dim,
            n_latents=N_LATENTS,
            k=K,
            hook_point=HOOK,
            model=lm.identity(),
            exclude_first_positions=1,
        )
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_enc[-3:] = -1e4  # three latents that can never fire
    out = tmp_path_factory.mktemp("sae") / "sae"
    sae.save(out)
    return out


def run(tmp_path, tiny, sentences, sae_dir, **kw) -> Path:
    out = tmp_path / kw.pop("name", "top")
    base = dict(
        sae=str(sae_dir),
        sentences=str(sentences),
        out=str(out),
        model=str(tiny.hf_dir),
        top_n=TOP_N,
        non_activating=6,
        sampled=SAMPLED,
        hard_negatives=HARD,
        model_dtype="float32",
        device="cpu",
        max_sentences=0,
    )
    cfg = TopSentencesConfig(**{**base, **kw})
    top_main(cfg)
    return out


def brute_force(tiny, sentences, sae_dir):
    """Each sentence alone through the model and the dense SAE path: per-token latent activations [T, L]."""
    lm = load_model(tiny.hf_dir)
    sae = TopKSae.load(sae_dir)
    hook = sae.cfg.hook_point  # what the encoder reads (a transcoder's input)
    per_sentence = {}
    for part in iter_sentences(sentences):
        for sid, text in zip(part["sentence_id"], part["text"]):
            ids = lm.tokenizer.encode(text, bos=False)[:192]
            with torch.no_grad():
                acts = lm.model.capture(torch.tensor([ids]), [hook])[hook][0]
                values, idx = sae.encode(sae.normalize_input(acts.float())[0], dense=True)
            h = torch.zeros(len(ids), N_LATENTS).scatter(1, idx, values)
            h[:1] = 0  # the excluded first position
            per_sentence[sid] = h
    return per_sentence


def scores_of(h: torch.Tensor) -> dict[str, torch.Tensor]:
    counted = h[1:]
    if len(counted) == 0:
        return {a: torch.zeros(h.shape[1]) for a in AGGREGATIONS}
    return {"mean": counted.mean(0), "max": counted.max(0).values, "last": counted[-1]}


def test_top_n_equals_brute_force_and_browser_shows_it(tmp_path, tiny, sentences, sae_dir):
    out = run(tmp_path, tiny, sentences, sae_dir)
    res = open_top_sentences(out)
    ref = brute_force(tiny, sentences, sae_dir)
    ref_scores = {sid: scores_of(h) for sid, h in ref.items()}
    top = res.table("top_sentences").to_pylist()
    got: dict[tuple[int, str], list] = {}
    for r in top:
        got.setdefault((r["latent"], r["aggregation"]), []).append(r)
    for latent in range(N_LATENTS):
        for agg in AGGREGATIONS:
            # reference ranking: score descending, ties by lower sentence id, only sentences where it fired
            cand = sorted(((-float(s[agg][latent]), sid) for sid, s in ref_scores.items() if s[agg][latent] > 0))[
                :TOP_N
            ]
            rows = sorted(got.get((latent, agg), []), key=lambda r: r["rank"])
            assert len(rows) == len(cand), (latent, agg)
            np.testing.assert_allclose([r["score"] for r in rows], [-c[0] for c in cand], rtol=1e-4, atol=1e-5)
            for r, (neg, sid) in zip(rows, cand):
                # the same sentence unless two scores tie to within float noise
                if r["sentence_id"] != sid:
                    assert abs(float(ref_scores[r["sentence_id"]][agg][latent]) + neg) < 1e-5, (
                        latent,
                        agg,
                        r["sentence_id"],
                        sid,
                    )
                np.testing.assert_allclose(
                    r["token_activations"], ref[r["sentence_id"]][:, latent].tolist(), rtol=1e-4, atol=1e-5
                )
    # statistics against the brute force
    stats = {r["latent"]: r for r in res.table("latent_stats").to_pylist()}
    all_h = torch.cat([h[1:] for h in ref.values()])
    for latent in range(N_LATENTS):
        fired = all_h[:, latent] > 0
        assert stats[latent]["firing_tokens"] == int(fired.sum())
        if fired.any():
            assert stats[latent]["mean_activation"] == pytest.approx(float(all_h[fired, latent].mean()), rel=1e-4)
        assert sum(stats[latent]["histogram"]) == int(fired.sum())
    assert res.manifest["counts"]["latents_never_firing"] == 3
    # non-activating samples never fire; every latent that is silent somewhere gets min(6, #silent)
    silent = {}
    for r in res.table("non_activating").to_pylist():
        assert float(ref_scores[r["sentence_id"]]["max"][r["latent"]]) == 0
        silent.setdefault((r["latent"], r["kind"]), []).append(r)
    for latent in range(N_LATENTS):
        n_silent = sum(1 for sid, s in ref_scores.items() if s["max"][latent] == 0 and len(ref[sid]) > 1)
        assert len(silent.get((latent, "random"), [])) == min(6, n_silent)
    # the activating sample: sentences where it fires, as many as there are up to --sampled, ranked by their peak
    sampled = {}
    for r in top:
        if r["aggregation"] == "sample":
            sampled.setdefault(r["latent"], []).append(r)
    for latent in range(N_LATENTS):
        rows = sorted(sampled.get(latent, []), key=lambda r: r["rank"])
        firing = [sid for sid, s in ref_scores.items() if s["max"][latent] > 0]
        assert len(rows) == min(SAMPLED, len(firing)) and [r["rank"] for r in rows] == list(range(len(rows)))
        peaks = [float(ref_scores[r["sentence_id"]]["max"][latent]) for r in rows]
        np.testing.assert_allclose([r["score"] for r in rows], peaks, rtol=1e-4, atol=1e-5)
        assert peaks == sorted(peaks, reverse=True)
    # hard negatives: silent sentences holding the key token (the commonest peak token of the top ones by max)
    lm = load_model(tiny.hf_dir)
    texts_of = {sid: text for part in iter_sentences(sentences) for sid, text in zip(part["sentence_id"], part["text"])}
    ids = {
        sid: lm.tokenizer.encode(text, bos=False)[:192]
        for part in iter_sentences(sentences)
        for sid, text in zip(part["sentence_id"], part["text"])
    }
    n_hard = 0
    for latent in range(N_LATENTS):
        best = sorted((-float(s["max"][latent]), sid) for sid, s in ref_scores.items() if s["max"][latent] > 0)[
            : min(TOP_N, KEY_TOKEN_RANKS)
        ]
        votes = collections.Counter(ids[sid][int(ref[sid][:, latent].argmax())] for _, sid in best)
        if not votes:
            continue
        top_votes = max(votes.values())
        key = min(t for t, c in votes.items() if c == top_votes)
        holders = [sid for sid, s in ref_scores.items() if s["max"][latent] == 0 and key in ids[sid][1:]]
        rows = silent.get((latent, "shares_token"), [])
        assert len(rows) == min(HARD, len(holders)) and {r["sentence_id"] for r in rows} <= set(holders)
        assert {r["token"] for r in rows} <= {lm.tokenizer.id_to_piece(key)}
        n_hard += len(rows)
    assert n_hard > 0
    # the browser: an index row per latent, and the top sentence of latent 0 highlighted on its page
    write_browser(res, tmp_path / "no_meanings", tmp_path / "browser")
    index = (tmp_path / "browser" / "index.html").read_text()
    links = LinkParser.of(index)
    assert {f"latents/{i}.html" for i in range(N_LATENTS)} <= set(links.hrefs)
    best = min(got[(0, "max")], key=lambda r: r["rank"])
    sent = {r["sentence_id"]: r for r in res.table("sentences").to_pylist()}[best["sentence_id"]]
    page = (tmp_path / "browser" / "latents" / "0.html").read_text()
    parsed = LinkParser.of(page)
    # cut to 30 tokens either side of its peak, as the browser shows examples
    toks, peak_at = sent["tokens"], int(np.argmax(best["token_activations"]))
    first, end = max(0, peak_at - 30), min(len(toks), peak_at + 31)
    shown = ("…" if first else "") + "".join(toks[first:end]) + ("…" if end < len(toks) else "")
    assert shown in parsed.text_blocks
    shaded = [float(t) for t in parsed.titles]
    peak_token = int(np.argmax(best["token_activations"]))
    assert any(abs(v - best["token_activations"][peak_token]) <= 1e-3 * max(1, abs(v)) for v in shaded)
    # its closest latents by decoder cosine, against numpy over the whole [L, L] matrix, and how to steer it
    w = TopKSae.load(sae_dir).W_dec.detach().numpy().astype(np.float64)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = w @ w.T
    np.fill_diagonal(cos, -2)
    section = page.split("Closest latents")[1].split("</ul>")[0]
    assert [int(j) for j in re.findall(r"href='(\d+)\.html'", section)] == list(np.argsort(-cos[0], kind="stable")[:5])
    assert "--steer 0:add:" in page
    # the activating sample in quantile bands, strongest first, and the hard negatives under their key token
    bands = re.findall(r"Quantile (\d) of 4 \(peak ([\d.e+-]+) to ([\d.e+-]+)\)", page)
    assert [b[0] for b in bands] == ["1", "2", "3", "4"] and float(bands[0][2]) >= float(bands[-1][1])
    if silent.get((0, "shares_token")):
        assert "Silent though they hold its key token" in page
        for r in silent[(0, "shares_token")][:5]:
            assert html.escape(texts_of[r["sentence_id"]]) in page
    # the logit lens with its values, against numpy: unembedding · (final-norm gain * decoder row)
    lens = page.split("<h2>Logit lens</h2>")[1].split("<h2>")[0]
    w_out = lm.model.output.weight.detach().float().numpy().astype(np.float64)
    gain = lm.model.norm.weight.detach().float().numpy()
    effect = (TopKSae.load(sae_dir).W_dec.detach().numpy()[0] * gain) @ w_out.T
    shown_values = [float(v) for v in re.findall(r"<small>([+-][\d.]+)</small>", lens)]
    np.testing.assert_allclose(shown_values[:3], np.sort(effect)[::-1][:3], atol=0.006)
    np.testing.assert_allclose(shown_values[10:13], np.sort(effect)[:3], atol=0.006)  # most suppressed first
    z = stats[0]["logit_lens_z"]
    ref_z = max(effect.max() - effect.mean(), effect.mean() - effect.min()) / effect.std(ddof=1)
    assert z == pytest.approx(ref_z, rel=1e-3) and res.manifest["logit_lens_random_z"] > 0
    assert ("the logit lens says nothing" in lens) == (z < res.manifest["logit_lens_random_z"])


class LinkParser(HTMLParser):
    """Collects hrefs, span titles and the text of each sentence block (div.s without its score)."""

    def __init__(self):
        super().__init__()
        self.hrefs, self.titles, self.text_blocks = [], [], []
        self._in_block, self._skip, self._buf = False, False, []

    @classmethod
    def of(cls, text: str) -> LinkParser:
        p = cls()
        p.feed(text)
        p.close()
        return p

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "span" and "title" in a and a.get("class") == "a":
            self.titles.append(a["title"])
        if tag == "div" and a.get("class") == "s":
            self._in_block, self._buf = True, []
        if tag == "span" and a.get("class") == "score":
            self._skip = True

    def handle_endtag(self, tag):
        if tag == "span" and self._skip:
            self._skip = False
        elif tag == "div" and self._in_block:
            self._in_block = False
            self.text_blocks.append("".join(self._buf))

    def handle_data(self, data):
        if self._in_block and not self._skip:
            self._buf.append(data)


def test_ties_rank_lower_sentence_id_first_whatever_the_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (7, 60), generator=g).float()  # many ties
    ids = torch.arange(60)
    expect = sorted(range(60), key=lambda i: (-scores[0, i].item(), i))[:10]
    for perm in (torch.arange(60), torch.randperm(60, generator=g), torch.arange(59, -1, -1)):
        t = TopTable(7, 10)
        for chunk in perm.split(13):
            t.update(scores[:, chunk], ids[chunk])
        assert t.ids[0].tolist() == expect
        s, i = merge_top(scores, ids[None].expand(7, -1), 10)
        assert torch.equal(t.ids, i) and torch.equal(t.scores, s)


@pytest.mark.slow
def test_two_ranks_merge_to_the_single_process_result(tmp_path, tiny, sentences, sae_dir):
    one = run(tmp_path, tiny, sentences, sae_dir, name="one")
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **collective_env(tmp_path / "logs")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "capture_top_activating_sentences.py",
        "--sae",
        str(sae_dir),
        "--sentences",
        str(sentences),
        "--out",
        str(two),
        "--model",
        str(tiny.hf_dir),
        "--top-n",
        str(TOP_N),
        "--non-activating",
        "6",
        "--sampled",
        str(SAMPLED),
        "--hard-negatives",
        str(HARD),
        "--model-dtype",
        "float32",
        "--device",
        "cpu",
        "--max-sentences",
        "0",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert_ranks_agree(tmp_path / "logs", 2)  # held to NCCL's rules; both ranks ran the same collectives
    a, b = open_top_sentences(one), open_top_sentences(two)
    ta, tb = a.table("top_sentences").to_pylist(), b.table("top_sentences").to_pylist()
    assert [(r["latent"], r["aggregation"], r["rank"], r["sentence_id"]) for r in ta] == [
        (r["latent"], r["aggregation"], r["rank"], r["sentence_id"]) for r in tb
    ]
    np.testing.assert_allclose([r["score"] for r in ta], [r["score"] for r in tb], rtol=1e-5)
    assert a.table("non_activating").to_pylist() == b.table("non_activating").to_pylist()
    assert (
        a.table("latent_stats").column("firing_tokens").to_pylist()
        == b.table("latent_stats").column("firing_tokens").to_pylist()
    )
    assert a.manifest["counts"]["sentences"] == b.manifest["counts"]["sentences"]


def test_bad_inputs_and_shortfall(tmp_path, tiny, sentences, sae_dir):
    with pytest.raises(PipelineInputError, match="--hook-point resid_pre.0"):
        run(tmp_path, tiny, sentences, sae_dir, name="h", hook_point="resid_pre.0")
    other = TopKSae.load(sae_dir)
    other.cfg.model = {**other.cfg.model, "config_sha256": "0" * 64}
    other.save(tmp_path / "other_sae")
    with pytest.raises(PipelineInputError, match="--sae .*trained on"):
        run(tmp_path, tiny, sentences, tmp_path / "other_sae", name="o")
    with pytest.raises(PipelineInputError, match="--top-n"):
        run(tmp_path, tiny, sentences, sae_dir, name="n", top_n=0)
    out = run(tmp_path, tiny, sentences, sae_dir, name="short", max_sentences=3)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["sentences"] == 3 and "only 3 sentences" in m["shortfall"]


def test_browser_shows_meanings_and_rerun_reuses_or_refuses(tmp_path, tiny, sentences, sae_dir):
    meanings = tmp_path / "meanings"
    meanings.mkdir()
    (meanings / "run1.json").write_text(
        json.dumps(
            {
                "sae_sha256": sae_sha256(sae_dir),
                "explainer": "test",
                "latents": [{"latent": 2, "meaning": "words about <rivers> & lakes", "certainty": 0.8, "score": 0.71}],
            }
        )
    )
    (meanings / "other.json").write_text(
        json.dumps(
            {
                "sae_sha256": "0" * 64,
                "latents": [{"latent": 3, "meaning": "not this SAE", "certainty": 1.0, "score": None}],
            }
        )
    )
    out = run(tmp_path, tiny, sentences, sae_dir)
    browser = write_browser(open_top_sentences(out), meanings, tmp_path / "browser").parent
    page = (browser / "latents" / "2.html").read_text()
    assert "words about &lt;rivers&gt; &amp; lakes" in page and "0.71" in page
    assert "not this SAE" not in (browser / "index.html").read_text()
    before = (out / "top_sentences.parquet").stat().st_mtime_ns
    run(tmp_path, tiny, sentences, sae_dir)  # same inputs: reused, not recomputed
    assert (out / "top_sentences.parquet").stat().st_mtime_ns == before
    with pytest.raises(PipelineInputError, match="top-sentences output made with other settings"):
        run(tmp_path, tiny, sentences, sae_dir, top_n=3)


# ---- activations read back from the SAE's capture (--source) ---------------------------------------


def capture_of(tmp_path, tiny, sentences, name: str, **kw) -> Path:
    from capture_activations import main as capture_main
    from pipeline.capture.config import CaptureConfig

    out = tmp_path / name
    base = dict(hook_points=[HOOK], model_dtype="float32", storage_dtype="float32", shard_tokens=300)
    capture_main(
        CaptureConfig(sentences=str(sentences), out=str(out), model=str(tiny.hf_dir), device="cpu", **{**base, **kw})
    )
    return out


def tables(out: Path) -> dict[str, list]:
    res = open_top_sentences(out)
    return {
        name: res.table(name).to_pylist() for name in ("top_sentences", "non_activating", "latent_stats", "sentences")
    }


def test_captured_sentences_come_back_whole_and_once_for_any_number_of_readers(tmp_path, tiny, sentences):
    """Shards of 300 tokens cut sentences in two; every reader split still yields each sentence once,
    with the rows the capture stored for it (concatenated across the shards it straddles)."""
    from pipeline.capture.activations import CaptureOutput, act_key, load_shard, sentence_rows

    capture = CaptureOutput.open(capture_of(tmp_path, tiny, sentences, "acts", shard_tokens=97))
    pieces: dict[int, list] = {}
    for path in capture.shard_paths:
        shard = load_shard(path)
        for sid, pos, a, b in sentence_rows(shard):
            pieces.setdefault(sid, []).append((pos, shard[act_key(HOOK)][a:b], shard["token_ids"][a:b]))
    assert any(len(p) > 1 for p in pieces.values())  # the test exercises straddling sentences
    expected = {sid: (torch.cat([a for _, a, _ in p]), torch.cat([t for _, _, t in p])) for sid, p in pieces.items()}
    for world_size, slice_sentences in ((1, 1024), (2, 1024), (3, 1024), (2, 3)):
        got = {}
        for rank in range(world_size):
            for chunk in capture.read_sentences(HOOK, rank, world_size, 64, slice_sentences):
                # a slice is bounded by sentences too: a stretch of 1-token sentences must not make the reader's
                # [n_latents, sentences] tables as long as max_rows
                assert len(chunk.sentence_ids) <= slice_sentences
                for i, sid in enumerate(chunk.sentence_ids):
                    assert sid not in got, (world_size, sid)
                    a, b = chunk.starts[i], chunk.starts[i + 1]
                    got[sid] = (chunk.acts[a:b], torch.from_numpy(chunk.token_ids[a:b]))
        assert sorted(got) == sorted(expected), world_size
        for sid, (acts, ids) in expected.items():
            assert torch.equal(got[sid][0], acts) and torch.equal(got[sid][1], ids), (world_size, sid)


def test_tables_from_the_capture_equal_the_model_run(tmp_path, tiny, sentences, sae_dir):
    """fp32 capture: reading it gives exactly the tables of running the model (same batches, same kernels,
    nothing rounded on the way to disk); a capture of the first 20 sentences serves those and the model
    the rest (within fp32 rounding); --source capture refuses what it does not hold."""
    full = capture_of(tmp_path, tiny, sentences, "acts")
    model = run(tmp_path, tiny, sentences, sae_dir, name="model", source="model")
    from_capture = run(tmp_path, tiny, sentences, sae_dir, name="cap", capture=str(full), source="capture")
    m = json.loads((from_capture / "manifest.json").read_text())
    assert m["source"]["model_sentences"] == 0 and m["source"]["capture_sentences"] == m["counts"]["sentences"]
    assert tables(from_capture) == tables(model)
    assert m["counts"] == json.loads((model / "manifest.json").read_text())["counts"]

    part = capture_of(tmp_path, tiny, sentences, "acts20", max_sentences=20)
    mixed = run(tmp_path, tiny, sentences, sae_dir, name="mixed", capture=str(part))
    m = json.loads((mixed / "manifest.json").read_text())["source"]
    assert m["capture_sentences"] == 20 and m["model_sentences"] > 0, m
    # the model's share is batched differently from the all-model run (its first row group starts at
    # sentence 20): the same rows and ids, scores equal up to fp32 rounding of other matmul shapes
    got, want = tables(mixed), tables(model)
    assert got["non_activating"] == want["non_activating"] and got["sentences"] == want["sentences"]
    key = ("latent", "aggregation", "rank", "sentence_id")
    assert [[r[k] for k in key] for r in got["top_sentences"]] == [[r[k] for k in key] for r in want["top_sentences"]]
    for g, w in zip(got["top_sentences"], want["top_sentences"]):
        np.testing.assert_allclose(g["score"], w["score"], rtol=1e-5)
        np.testing.assert_allclose(g["token_activations"], w["token_activations"], rtol=1e-4, atol=1e-4)
    with pytest.raises(PipelineInputError, match="--source capture: .*acts20 holds sentences 0..19"):
        run(tmp_path, tiny, sentences, sae_dir, name="refused", capture=str(part), source="capture")


def test_a_bf16_capture_gives_the_scores_of_bf16_rounded_activations(tmp_path, tiny, sentences, sae_dir):
    """Stored in bf16, the capture path scores what the SAE gets from disk: the brute-force scores of the
    activations rounded to bf16 (within fp32 noise), and the fp32 model run's within bf16 rounding."""
    acts = capture_of(tmp_path, tiny, sentences, "acts16", storage_dtype="bfloat16")
    out = run(tmp_path, tiny, sentences, sae_dir, name="bf16", capture=str(acts), source="capture")
    lm, sae = load_model(tiny.hf_dir), TopKSae.load(sae_dir)
    ref = {}
    for part in iter_sentences(sentences):
        for sid, text in zip(part["sentence_id"], part["text"]):
            ids = lm.tokenizer.encode(text, bos=False)[:192]
            with torch.no_grad():
                a = lm.model.capture(torch.tensor([ids]), [HOOK])[HOOK][0].bfloat16().float()
                values, idx = sae.encode(sae.normalize_input(a)[0], dense=True)
            ref[sid] = scores_of(torch.zeros(len(ids), N_LATENTS).scatter(1, idx, values))
    top = open_top_sentences(out).table("top_sentences").to_pylist()
    assert len(top) > 50
    got = np.array([r["score"] for r in top])
    kind = {a: a for a in AGGREGATIONS} | {"sample": "max"}  # a sampled sentence's score is its peak
    want = np.array([ref[r["sentence_id"]][kind[r["aggregation"]]][r["latent"]].item() for r in top])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    model = {
        (r["latent"], r["aggregation"], r["rank"]): r["score"]
        for r in tables(run(tmp_path, tiny, sentences, sae_dir, name="fp32", source="model"))["top_sentences"]
    }
    firsts = [(model[(r["latent"], r["aggregation"], 0)], r["score"]) for r in top if r["rank"] == 0]
    np.testing.assert_allclose(*zip(*firsts), rtol=2e-2, atol=2e-2)  # bf16: 8 bits of mantissa


def test_a_capture_that_does_not_match_the_sae_is_refused_or_bypassed(tmp_path, tiny, sentences, sae_dir):
    other_hook = capture_of(tmp_path, tiny, sentences, "acts0", hook_points=["resid_pre.0"])
    with pytest.raises(
        PipelineInputError, match="--source capture: capture .*acts0: it holds resid_pre.0, not the SAE"
    ):
        run(tmp_path, tiny, sentences, sae_dir, name="r", capture=str(other_hook), source="capture")
    with pytest.raises(PipelineInputError, match="--source capture: the SAE records no capture it was trained from"):
        run(tmp_path, tiny, sentences, sae_dir, name="r2", source="capture")
    bf16_model = capture_of(tmp_path, tiny, sentences, "actsb", model_dtype="bfloat16")
    with pytest.raises(PipelineInputError, match="its model ran in torch.bfloat16, not the requested torch.float32"):
        run(tmp_path, tiny, sentences, sae_dir, name="r3", capture=str(bf16_model), source="capture")
    out = run(tmp_path, tiny, sentences, sae_dir, name="auto", capture=str(other_hook))
    note = json.loads((out / "manifest.json").read_text())["source"]
    assert note["capture_sentences"] == 0 and "resid_pre.0" in note["note"], note


@pytest.mark.parametrize("site", ["attn_out.1", "mlp_out.0", "transcoder"])
def test_every_site_and_a_transcoder_rank_as_brute_force(tmp_path, tiny, sentences, site):
    """SAEs on the attention and MLP outputs and a transcoder (encoder on ffn_norm.1): the top sentences' scores
    are the brute-force ones from the hook point the encoder reads."""
    lm = load_model(tiny.hf_dir)
    torch.manual_seed(1)
    hooks = (
        {"hook_point": "ffn_norm.1", "output_hook_point": "mlp_out.1"} if site == "transcoder" else {"hook_point": site}
    )
    sae = TopKSae(
        SaeConfig(
            d_model=lm.args.dim, n_latents=N_LATENTS, k=K, model=lm.identity(), exclude_first_positions=1, **hooks
        )
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    sae.save(tmp_path / "sae")
    res = open_top_sentences(run(tmp_path, tiny, sentences, tmp_path / "sae"))
    ref = {sid: scores_of(h)["max"] for sid, h in brute_force(tiny, sentences, tmp_path / "sae").items()}
    best = {}
    for r in res.table("top_sentences").to_pylist():
        if r["aggregation"] == "max" and r["rank"] == 0:
            best[r["latent"]] = r["score"]
    assert len(best) > N_LATENTS // 2
    for latent, score in best.items():
        assert score == pytest.approx(max(float(s[latent]) for s in ref.values()), rel=1e-4, abs=1e-5)
