"""The top-sentences stage: stream every sentence through the model and SAE (or re-read the training capture), keep
each latent's top and silent sentences and statistics across ranks, write the tables.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from llama_3 import load_model
from llama_3.cpu_fast import apply_cpu_fast_paths
from llama_3.cpu_features import warn_if_emulated
from llama_3.errors import PipelineInputError
from pipeline.core import fault_injection
from pipeline.core.cli import resolve_dtype
from pipeline.core.distributed import DistInfo
from pipeline.core.manifest import (
    MANIFEST_NAME,
    atomic_path,
    fingerprint,
    make_manifest,
    sha256_file,
    write_json_atomic,
)
from pipeline.core.output_folder import OutputFolder, config_request, owned_names
from pipeline.core.runtime import capture_dtype, forward_batch_tokens, release_free_memory
from pipeline.sae.formats import sae_sha256, sae_weights_file
from pipeline.sae.model import TopKSae
from pipeline.sentences.dataset import SentenceDataset, SentenceTokenDataset, iter_sentences
from pipeline.top_sentences.code_store import CodeStore
from pipeline.top_sentences.config import TopSentencesConfig
from pipeline.top_sentences.hard_negatives import KEY_TOKEN_RANKS, find_hard_negatives, key_tokens
from pipeline.top_sentences.sources import capture_batches, from_model_batch, plan_source
from pipeline.top_sentences.tables import (
    AGGREGATIONS,
    FILES,
    HIST_BINS,
    KIND,
    ROW_KINDS,
    SAMPLE,
    SILENT_KINDS,
    LatentStats,
    SparseSample,
    TopTable,
    histogram_edges,
    joined_codes,
    sample_key,
    sentence_scores,
)


def request_fingerprint(cfg: TopSentencesConfig) -> str:
    """What the output depends on: the SAE's weights, the sentence dataset, and the config."""
    sentences = Path(cfg.sentences) / MANIFEST_NAME
    return fingerprint(
        {
            "sae_sha256": sae_sha256(cfg.sae) if sae_weights_file(cfg.sae).is_file() else None,
            "sentences": sentences.read_text() if sentences.is_file() else None,
            **config_request(cfg),
        }
    )


def output_folder(cfg: TopSentencesConfig) -> OutputFolder:
    return OutputFolder(
        Path(cfg.out),
        "top-sentences output",
        owned_names(MANIFEST_NAME, *FILES, prefixes=(".codes-r",)),
        foreign_ok=True,
    )


def check_compatible(sae: TopKSae, identity: dict, cfg: TopSentencesConfig) -> None:
    sae.check_model(identity, f"--sae {cfg.sae}")
    if cfg.hook_point and cfg.hook_point != sae.cfg.hook_point:
        raise PipelineInputError(
            f"--hook-point {cfg.hook_point}: the SAE in {cfg.sae} was trained at {sae.cfg.hook_point}"
        )


@dataclass
class Collector:
    """This rank's running result: each latent's top sentences per aggregation, its silent sample, its
    statistics, and every sentence's per-token codes (for highlighting the top ones later)."""

    sae: TopKSae
    tables: dict[str, TopTable]
    silent: TopTable
    stats: LatentStats
    store: CodeStore
    batch_tokens: int
    """Rows per SAE pass: one forward batch, as the model source makes them (the same kernel shapes, so the
    capture and model sources agree exactly)."""
    skip_first: int
    """Positions the SAE never saw (BOS, the sink): stored as zero codes."""

    def add(self, batch, device: torch.device) -> None:
        sae, L = self.sae, self.sae.cfg.n_latents
        B = len(batch.sentence_ids)
        x = batch.acts.to(device).float()  # [n, d]
        parts = [sae(x[a : a + self.batch_tokens]) for a in range(0, len(x), self.batch_tokens)]
        values, indices = joined_codes(parts, active_first=sae.cfg.activation != "topk")  # [n, w]
        n_counted = batch.n_counted.to(device)
        row = torch.repeat_interleave(torch.arange(B, device=device), n_counted, output_size=len(x))
        is_last = torch.zeros(len(x), dtype=torch.bool, device=device)
        is_last[(n_counted.cumsum(0) - 1)[n_counted > 0]] = True  # each sentence's last counted token
        scores = sentence_scores(values, indices, row, is_last, B, L)
        has_tokens = n_counted > 0  # a sentence with no counted token ranks nowhere
        sids = batch.sentence_ids.to(device)
        for a in AGGREGATIONS:
            s = scores[a].t().masked_fill(~has_tokens[None, :], -torch.inf)
            self.tables[a].update(s.masked_fill(s <= 0, -torch.inf), sids)
        never = (scores["max"].t() <= 0) & has_tokens[None, :]  # [L, B]
        self.silent.update(sample_key(sids, L).masked_fill(~never, -torch.inf), sids)
        if SAMPLE in self.tables:  # activating sentences at random: every activation level, not the top only
            fires = scores["max"].t() > 0
            self.tables[SAMPLE].update(sample_key(sids, L, salt=1).masked_fill(~fires, -torch.inf), sids)
        self.stats.add(values, indices)
        # Per-token codes for later highlighting, the uncounted first positions left at zero.
        v_np, i_np = values.float().cpu().numpy(), indices.cpu().numpy()
        n_active = (v_np > 0).sum(1)  # [n]; JumpReLU rows hold their active latents first
        counts = batch.n_counted.numpy()
        starts = np.concatenate([[0], np.cumsum(counts)])
        for r, sid in enumerate(batch.sentence_ids.tolist()):
            tokens, c, a, b = batch.tokens[r], counts[r], starts[r], starts[r + 1]
            width = values.shape[1] if sae.cfg.activation == "topk" else max(1, n_active[a:b].max(initial=0))
            full_v = np.zeros((len(tokens), width), np.float32)
            full_i = np.zeros((len(tokens), width), np.int32)
            full_v[len(tokens) - c :], full_i[len(tokens) - c :] = v_np[a:b, :width], i_np[a:b, :width]
            self.store.add(sid, tokens, self.skip_first, full_v, full_i)


def collect(cfg: TopSentencesConfig, info: DistInfo) -> dict:
    out = Path(cfg.out)
    if cfg.top_n < 1 or min(cfg.non_activating, cfg.sampled, cfg.hard_negatives) < 0:
        raise PipelineInputError(
            f"--top-n {cfg.top_n} / --non-activating {cfg.non_activating} / --sampled {cfg.sampled} / "
            f"--hard-negatives {cfg.hard_negatives}: need top-n >= 1 and the others >= 0"
        )
    sae_dir = Path(cfg.sae)
    sae = TopKSae.load(sae_dir, device=info.device).eval()
    sentences = SentenceDataset.open(cfg.sentences)
    request = request_fingerprint(cfg)
    prepared = output_folder(cfg).prepare(request, cfg.force, info)
    if prepared.state == "reuse":
        if info.is_main:
            print(f"{out}: already complete for this SAE and config (use --force to recompute)")
        return prepared.manifest
    trained_on = sae.cfg.trained_on  # an SAE copied alone or imported: every sentence, through the model
    max_sentences = trained_on.capture_sentences if cfg.max_sentences < 0 else cfg.max_sentences
    capture_dir = Path(cfg.capture) if cfg.capture else Path(trained_on.capture) if trained_on.capture else None
    requested_dtype = resolve_dtype(cfg.model_dtype)
    plan = plan_source(
        cfg.source, capture_dir, sae, sentences, max_sentences, requested_dtype, capture_dtype(info.device)
    )
    if info.is_main:
        print(f"top sentences: {plan.note}")
    if plan.needs_model_forward:
        warn_if_emulated(plan.model_dtype, info.device, f"--model-dtype {cfg.model_dtype}")
    # loaded also when the capture holds everything: its tokenizer names tokens, its unembedding the
    # latents' promoted tokens
    lm = load_model(sae.model_path(cfg.model, f"--sae {cfg.sae}"), device=info.device, dtype=plan.model_dtype)
    check_compatible(sae, lm.identity(), cfg)
    tokenization = sae.cfg.tokenization  # the sequences the SAE was trained on
    if tokenization.add_bos and lm.tokenizer.bos_id is None:
        raise PipelineInputError(f"--sae {cfg.sae}: trained with BOS, but {lm.path} has no BOS token")
    # the capture's batch size, for both sources: the SAE then sees the rows in the same groups either way
    batch_tokens = cfg.max_batch_tokens or forward_batch_tokens(info.device)
    data = None
    if plan.needs_model_forward:
        apply_cpu_fast_paths(lm.model)  # as the capture ran it: same kernels, same numbers
        data = SentenceTokenDataset(
            cfg.sentences,
            lm.tokenizer,
            max_tokens=tokenization.sequence_tokens,
            add_bos=tokenization.add_bos,
            max_batch_tokens=batch_tokens,
            rank=info.rank,
            world_size=info.world_size,
            max_sentences=plan.end,
            first_sentence=plan.capture_end,
        )
    if plan.end == 0:
        raise PipelineInputError(f"--sentences {cfg.sentences}: no sentences to run")
    L, hook = sae.cfg.n_latents, sae.cfg.hook_point
    skip_first = tokenization.skip_first_positions  # positions it never saw: BOS, the sink

    def batches():
        if plan.capture:
            yield from capture_batches(
                plan, hook, tokenization, lm.tokenizer.bos_id, info.rank, info.world_size, 4 * batch_tokens
            )
        for batch in data or ():
            acts = lm.model.capture(batch.tokens.to(info.device), [hook])[hook]  # [B, T, d]
            yield from_model_batch(batch, acts, skip_first)

    found = Collector(
        sae,
        {a: TopTable(L, cfg.top_n, info.device) for a in AGGREGATIONS}
        | ({SAMPLE: TopTable(L, cfg.sampled, info.device)} if cfg.sampled else {}),
        TopTable(L, max(cfg.non_activating, 1), info.device),
        LatentStats(L, info.device),
        CodeStore(out, info.rank),
        batch_tokens,
        skip_first,
    )
    expected = plan.capture_end // info.world_size + (data.n_sentences if data else 0)
    bar = tqdm(total=expected, unit="sent", disable=not info.is_main, dynamic_ncols=True, desc="top sentences")
    t0, n_sentences, n_model_sentences, n_batches = time.perf_counter(), 0, 0, 0
    try:
        with torch.inference_mode():
            for batch in batches():
                B = len(batch.sentence_ids)
                found.add(batch, info.device)
                n_sentences += B
                n_model_sentences += 0 if batch.from_capture else B  # the capture skips token-less ones
                bar.update(B)
                bar.set_postfix_str(f"{n_sentences / (time.perf_counter() - t0):.0f} sent/s", refresh=False)
                fault_injection.point("top_sentences.batch")
                if n_batches % 64 == 63:
                    release_free_memory()
                n_batches += 1
        bar.close()
        elapsed = time.perf_counter() - t0
        tables, silent, stats = merge_ranks(found.tables, found.silent, found.stats, info)
        found.store.open()
        rows = top_rows(tables, silent, found.store, info, cfg.hard_negatives, skip_first)
        n_sentences = n_sentences_all(info, n_model_sentences) + plan.capture_end
        if not info.is_main:
            return {}
        return write_outputs(
            cfg, out, lm, sae, tables, silent, stats, rows, n_sentences, elapsed, max_sentences, request, plan
        )
    finally:
        found.store.close()


def n_sentences_all(info: DistInfo, n: int) -> int:
    if not info.distributed:
        return n
    t = torch.tensor([n], device=info.device)
    dist.all_reduce(t)
    return int(t.item())


def merge_ranks(tables: dict, silent: TopTable, stats: LatentStats, info: DistInfo):
    """Every rank ends with the exact merged tables (gathered, merged in rank order, same everywhere)."""
    if not info.distributed:
        return tables, silent, stats
    for t in stats.tensors():
        dist.all_reduce(t)
    for table in [*tables.values(), silent]:  # tensor collectives on the device: no pickled copies
        scores = [torch.empty_like(table.scores) for _ in range(info.world_size)]
        ids = [torch.empty_like(table.ids) for _ in range(info.world_size)]
        dist.all_gather(scores, table.scores)
        dist.all_gather(ids, table.ids)
        merged = TopTable(table.scores.shape[0], table.n, info.device)
        for rank_scores, rank_ids in zip(scores, ids):  # rank order: every rank merges to the same table
            merged.update(rank_scores, rank_ids)
        table.scores, table.ids = merged.scores, merged.ids
    return tables, silent, stats


def top_rows(tables: dict, silent: TopTable, store: CodeStore, info: DistInfo, n_hard: int, skip_first: int) -> dict:
    """Rows for the output tables, each filled by the rank that holds the sentence's codes.

    Every stored sentence that some latent ranks is read once, in file order (a latent's per-token
    activations come from that one read), not once per (latent, aggregation, rank) row."""
    lat, agg, rank, sid, score = [], [], [], [], []
    for name, table in tables.items():
        scores, ids = table.scores.cpu().numpy(), table.ids.cpu().numpy()  # one device-to-host copy each
        latents, ranks = np.nonzero(np.isfinite(scores))
        lat.append(latents), rank.append(ranks), agg.append(np.full(len(latents), ROW_KINDS.index(name)))
        sid.append(ids[latents, ranks]), score.append(scores[latents, ranks])
    lat, agg, rank, sid, score = (np.concatenate(x) for x in (lat, agg, rank, sid, score))
    held, first, length = store.spans(sid)
    sentences = {}
    order = np.flatnonzero(held)[np.argsort(first[held], kind="stable")]  # rows grouped by sentence, file order
    acts = np.zeros(length[order].sum() if len(order) else 0, np.float32)  # every row's per-token activations
    peak_token = np.zeros(len(order), np.int64)  # each row's token at its peak activation
    offsets = np.concatenate([[0], np.cumsum(length[order])]).astype(np.int64)
    bounds = np.flatnonzero(np.diff(first[order])) + 1
    at = 0
    for group in np.split(order, bounds) if len(order) else []:
        tokens, values, indices = store.read(int(first[group[0]]), int(length[group[0]]))
        sentences[int(sid[group[0]])] = tokens.tolist()
        for part in np.array_split(group, -(-len(group) // 1024)):  # [rows, n, k] stays under ~100 MB
            # [rows, n]: each row's latent is active in at most one of a token's k slots
            a = np.where(indices[None] == lat[part][:, None, None], values[None], 0.0).sum(-1).round(4)
            acts[offsets[at] : offsets[at + len(part)]] = a.reshape(-1)
            peak_token[at : at + len(part)] = tokens[a.argmax(1)]
            at += len(part)
    top = TopRows(lat[order], agg[order], rank[order], sid[order], score[order], offsets, acts)
    sampled = top.aggregation == ROW_KINDS.index(SAMPLE)
    top.score[sampled] = top.peaks()[sampled]  # a sample's rank key was random: its score is its peak activation
    hard = hard_negative_rows(top, peak_token, store, info, silent.scores.shape[0], n_hard, skip_first)
    local = {"top": top, "sentences": sentences}
    silent_ids = silent.ids.cpu().numpy()  # one device-to-host copy, not one per element
    silent_rows = [
        (int(latent), 0, int(silent_ids[latent, j]), -1)
        for latent, j in zip(*np.nonzero(np.isfinite(silent.scores.cpu().numpy())))
    ]
    if info.distributed:  # only rank 0 writes: only rank 0 receives the other ranks' rows
        parts = [None] * info.world_size if info.is_main else None
        dist.gather_object(local, parts, dst=0)
        if info.is_main:
            local = {
                "top": TopRows.concat([p["top"] for p in parts]),
                "sentences": {k: v for p in parts for k, v in p["sentences"].items()},
            }
    local["top"].rerank_samples()
    local["silent"] = silent_rows + hard
    return local


def hard_negative_rows(
    top: "TopRows", peak_token: np.ndarray, store: CodeStore, info: DistInfo, n_latents: int, n: int, skip_first: int
) -> list[tuple[int, int, int, int]]:
    """(latent, 1, sentence id, key token id) rows of every latent's hard negatives (on rank 0; [] elsewhere).

    The key token needs every rank's top rows, so their (latent, peak token) votes go to all ranks first; each
    rank then samples its own stored sentences and rank 0 merges the samples."""
    if not n:
        return []
    voters = (top.aggregation == ROW_KINDS.index("max")) & (top.rank < KEY_TOKEN_RANKS)
    votes = (top.latent[voters], peak_token[voters])
    if info.distributed:
        every = [None] * info.world_size
        dist.all_gather_object(every, votes)
        votes = tuple(np.concatenate([v[i] for v in every]) for i in range(2))
    key_token = key_tokens(*votes, n_latents)  # the same on every rank: votes gathered in rank order
    sample = find_hard_negatives(store, key_token, n, skip_first, progress=info.is_main)
    found = (sample.latent, sample.sentence_id, sample.key)
    if info.distributed:
        parts = [None] * info.world_size if info.is_main else None
        dist.gather_object(found, parts, dst=0)
        if not info.is_main:
            return []
        sample = SparseSample(n)
        for p in parts:
            sample.update(*p)
    return [(int(lat), 1, int(sid), int(key_token[lat])) for lat, sid in zip(sample.latent, sample.sentence_id)]


@dataclass
class TopRows:
    """The top-sentence table's rows as arrays (no Python object per row: ~400k rows at 4,608 latents)."""

    latent: np.ndarray  # [R]
    aggregation: np.ndarray  # [R] index into ROW_KINDS
    rank: np.ndarray  # [R]
    sentence_id: np.ndarray  # [R]
    score: np.ndarray  # [R] float32
    offsets: np.ndarray  # [R + 1]: row r's per-token activations are acts[offsets[r]:offsets[r+1]]
    acts: np.ndarray  # float32

    @staticmethod
    def concat(parts: list["TopRows"]) -> "TopRows":
        starts = np.cumsum([0] + [len(p.acts) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        fields = ("latent", "aggregation", "rank", "sentence_id", "score")
        cols = {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}
        return TopRows(**cols, offsets=offsets, acts=np.concatenate([p.acts for p in parts]))

    def peaks(self) -> np.ndarray:
        """[R] each row's peak token activation."""
        if not len(self.acts):
            return np.zeros(len(self.latent), np.float32)
        starts = self.offsets[:-1]
        nonempty = self.offsets[1:] > starts
        out = np.zeros(len(self.latent), np.float32)
        out[nonempty] = np.maximum.reduceat(self.acts, starts[nonempty])
        return out

    def rerank_samples(self) -> None:
        """Sample rows ranked by peak activation (descending, ties by lower sentence id) within their latent."""
        sampled = np.flatnonzero(self.aggregation == ROW_KINDS.index(SAMPLE))
        order = sampled[np.lexsort((self.sentence_id[sampled], -self.score[sampled], self.latent[sampled]))]
        latent = self.latent[order]
        first = np.flatnonzero(np.r_[True, latent[1:] != latent[:-1]]) if len(order) else order
        self.rank[order] = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))

    def table(self) -> pa.Table:
        """Sorted by latent, aggregation, rank (the contract's order)."""
        order = np.lexsort((self.rank, self.aggregation, self.latent))
        token_acts = pa.LargeListArray.from_arrays(
            pa.array(self.offsets, pa.int64()), pa.array(self.acts, pa.float32())
        )
        return pa.table(
            {
                "latent": pa.array(self.latent[order], pa.int32()),
                "aggregation": pa.array(np.array(ROW_KINDS, dtype=object)[self.aggregation[order]], pa.string()),
                "rank": pa.array(self.rank[order], pa.int16()),
                "sentence_id": pa.array(self.sentence_id[order], pa.int64()),
                "score": pa.array(self.score[order], pa.float32()),
                "token_activations": token_acts.take(pa.array(order)).cast(pa.list_(pa.float32())),
            }
        )


@dataclass
class LogitLens:
    """Per latent, the output tokens its decoder row promotes and suppresses most directly, with their logit effects
    (unembedding · (final-norm gain ⊙ decoder row), per unit of activation), and how far its strongest effect stands
    out: z = (max |effect| - mean) / std over the vocabulary, against `random_z`, the 95th percentile of the same for
    random directions of the same norm (a latent below it: its lens says no more than a random direction's)."""

    promoted: list[list[str]]
    promoted_logits: list[list[float]]
    suppressed: list[list[str]]
    suppressed_logits: list[list[float]]
    z: list[float]
    random_z: float


RANDOM_DIRECTIONS = 256  # for LogitLens.random_z


def logit_lens(lm, sae: TopKSae, n: int) -> LogitLens:
    """[L, vocab] effects in chunks of 512 latents: never the whole matrix at once."""
    W_out = lm.model.output.weight.float()  # [vocab, d]
    gain = lm.model.norm.weight.float()

    def effects(rows: torch.Tensor):  # rows [m, d] -> (top [m, n], bottom [m, n], z [m])
        effect = (rows * gain) @ W_out.t()  # [m, vocab]
        top, bottom = effect.topk(n, dim=1), (-effect).topk(n, dim=1)
        mean, std = effect.mean(1), effect.std(1).clamp_min(1e-12)
        z = torch.maximum(top.values[:, 0] - mean, bottom.values[:, 0] + mean) / std
        return top, bottom, z

    out = LogitLens([], [], [], [], [], 0.0)
    pieces: dict[int, str] = {}
    with torch.inference_mode():
        for a in range(0, sae.cfg.n_latents, 512):
            top, bottom, z = effects(sae.W_dec[a : a + 512].float())
            for ids, kept, vals in ((top, out.promoted, out.promoted_logits), (bottom, out.suppressed, None)):
                kept += [
                    [pieces.setdefault(i, lm.tokenizer.id_to_piece(i)) for i in row] for row in ids.indices.tolist()
                ]
            out.promoted_logits += top.values.round(decimals=4).tolist()
            out.suppressed_logits += (-bottom.values).round(decimals=4).tolist()
            out.z += z.tolist()
        norm = sae.W_dec.float().norm(dim=1).median()
        random = torch.randn(RANDOM_DIRECTIONS, W_out.shape[1], generator=torch.Generator().manual_seed(0))
        random = (random / random.norm(dim=1, keepdim=True)).to(W_out.device) * norm  # drawn on the CPU: any device
        out.random_z = float(effects(random)[2].cpu().quantile(0.95))  # [256]: on the CPU, any device
    return out


def write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_outputs(
    cfg,
    out: Path,
    lm,
    sae: TopKSae,
    tables,
    silent,
    stats,
    rows,
    n_sentences: int,
    elapsed: float,
    max_sentences: int,
    request: str,
    plan,
) -> dict:
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the manifest marks completion: written last
    top = rows["top"]
    write_parquet(out / "top_sentences.parquet", top.table())
    silent_rows = sorted(rows["silent"])  # (latent, kind, sentence id, key token id or -1)
    write_parquet(
        out / "non_activating.parquet",
        pa.table(
            {
                "latent": pa.array([r[0] for r in silent_rows], pa.int32()),
                "sentence_id": pa.array([r[2] for r in silent_rows], pa.int64()),
                "kind": pa.array([SILENT_KINDS[r[1]] for r in silent_rows], pa.string()),
                "token": pa.array(
                    [lm.tokenizer.id_to_piece(r[3]) if r[3] >= 0 else None for r in silent_rows], pa.string()
                ),
            }
        ),
    )
    # Sentence texts and token strings for every referenced sentence.
    wanted = set(rows["sentences"]) | {r[2] for r in silent_rows}
    texts = {}
    for cols in iter_sentences(cfg.sentences):
        for sid, text in zip(cols["sentence_id"], cols["text"]):
            if sid in wanted:
                texts[sid] = text
        if max_sentences and cols["sentence_id"] and cols["sentence_id"][-1] >= max_sentences:
            break
    sids = sorted(wanted)
    pieces = {}
    write_parquet(
        out / "sentences.parquet",
        pa.table(
            {
                "sentence_id": pa.array(sids, pa.int64()),
                "text": [texts.get(s, "") for s in sids],
                "tokens": pa.array(
                    [
                        [pieces.setdefault(t, lm.tokenizer.id_to_piece(t)) for t in rows["sentences"].get(s, [])]
                        for s in sids
                    ],
                    pa.list_(pa.string()),
                ),
            }
        ),
    )
    lens = logit_lens(lm, sae, cfg.output_tokens)
    tokens = max(int(stats.tokens.item()), 1)
    firing = stats.firing.cpu().numpy()
    mean_act = (stats.total.cpu().numpy() / np.maximum(firing, 1)).astype(np.float32)
    write_parquet(
        out / "latent_stats.parquet",
        pa.table(
            {
                "latent": pa.array(np.arange(sae.cfg.n_latents), pa.int32()),
                "firing_tokens": pa.array(firing, pa.int64()),
                "frequency": pa.array(firing / tokens, pa.float64()),
                "mean_activation": pa.array(mean_act, pa.float32()),
                "histogram": pa.array(stats.hist.view(-1, HIST_BINS).cpu().tolist(), pa.list_(pa.int64())),
                "promoted": pa.array(lens.promoted, pa.list_(pa.string())),
                "promoted_logits": pa.array(lens.promoted_logits, pa.list_(pa.float32())),
                "suppressed": pa.array(lens.suppressed, pa.list_(pa.string())),
                "suppressed_logits": pa.array(lens.suppressed_logits, pa.list_(pa.float32())),
                "logit_lens_z": pa.array(lens.z, pa.float32()),
            }
        ),
    )
    per_latent = np.zeros((len(ROW_KINDS), sae.cfg.n_latents), np.int64)
    np.add.at(per_latent, (top.aggregation, top.latent), 1)
    coverage = {a: int((per_latent[i] >= cfg.top_n).sum()) for i, a in enumerate(AGGREGATIONS)}
    counts = {
        "sentences": n_sentences,
        "tokens": tokens,
        "latents": sae.cfg.n_latents,
        "latents_with_top_n": coverage,
        "latents_with_any_sentence": int((per_latent[1] > 0).sum()),
        "latents_never_firing": int((firing == 0).sum()),
        "top_rows": len(top.latent),
        "non_activating_rows": sum(r[1] == 0 for r in silent_rows),
        "hard_negative_rows": sum(r[1] == 1 for r in silent_rows),
        "sampled_rows": int((top.aggregation == ROW_KINDS.index(SAMPLE)).sum()),
    }
    shortfall = None
    if n_sentences < cfg.top_n:
        shortfall = f"only {n_sentences} sentences for --top-n {cfg.top_n}: every latent has fewer than N"
        print(f"warning: {shortfall}")
    manifest = make_manifest(
        KIND,
        config=asdict(cfg),
        inputs={
            "sae": str(cfg.sae),
            "sae_sha256": sae.sha256,
            "sae_cfg": asdict(sae.cfg),
            "sentences": str(cfg.sentences),
            "model": lm.identity(),
        },
        counts=counts,
        fingerprint=request,
        sentence_set=(
            f"the first {max_sentences} sentences (the SAE capture's: held-out + training)"
            if max_sentences
            else "every sentence of the dataset"
        ),
        aggregations=list(AGGREGATIONS),
        histogram_edges=histogram_edges(),
        logit_lens_random_z=round(lens.random_z, 3),
        tokenization=asdict(sae.cfg.tokenization),
        excluded_positions=sae.cfg.tokenization.skip_first_positions,
        shortfall=shortfall,
        source=plan.describe(),
        throughput={"seconds": round(elapsed, 2), "sentences_per_s": round(n_sentences / max(elapsed, 1e-9), 1)},
        files={name: sha256_file(out / name) for name in FILES},
    )  # readers verify them: a changed byte is refused
    write_json_atomic(out / MANIFEST_NAME, manifest)
    print(
        f"{out}: {n_sentences} sentences ({n_sentences / max(elapsed, 1e-9):.0f}/s), {sae.cfg.n_latents} latents; "
        f"{coverage['max']} have >= {cfg.top_n} sentences (max), {counts['latents_never_firing']} never fire"
    )
    return manifest
