"""Steering vectors at a hook point, with strengths in units of the stream's own norm.

Two kinds of direction, compared on equal terms by the steering evaluation:
    sae       an SAE latent's decoder row (what `add` steering adds; the SAE's error term cancels, so
              adding the row at strength s moves the stream by exactly s x the row)
    diffmean  mean activation at the hook over the latent's top-activating sentences minus the mean
              over its silent sentences (AxBench's DiffMean, from the same examples the explainer saw)

Every direction is unit-norm and added as `factor x residual_norm x direction` at every position the
SAE trained on (the attention sink is left alone): one factor means the same push for every method,
latent and layer, where "4 x the latent's largest activation" does not.
"""

from __future__ import annotations

import torch

from llama_3.hooks import Splice
from pipeline.core.tokenization import Tokenization


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """[n, d] -> each row over its L2 norm (zero rows stay zero)."""
    v = v.float()
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def sae_directions(sae, latents: list[int]) -> torch.Tensor:
    """[n, d_model] unit decoder rows. The SAE's input normalisation is a positive scale per token (or
    for the whole dataset), so the row's direction in the model's stream is the row's own direction."""
    return unit_rows(sae.W_dec[torch.as_tensor(latents, device=sae.W_dec.device)].detach())


def vector_splice(offsets: torch.Tensor, skip_first_positions: int) -> Splice:
    """A Splice adding offsets[b] ([R, d_model], fp32) to every position of batch row b from
    `skip_first_positions` on (left padding has negative positions: untouched too). A zero row leaves
    its stream bit-for-bit clean, so steered and unsteered rows share one batch."""

    def add(x: torch.Tensor) -> torch.Tensor:
        if offsets.shape[0] != x.shape[0]:
            raise ValueError(f"vector_splice: {offsets.shape[0]} offset rows for a batch of {x.shape[0]}")
        return x.float() + offsets.to(x.device)[:, None, :]

    return Splice(add, skip_first_positions=skip_first_positions)


@torch.inference_mode()
def hook_sums(
    model, hook_point: str, tokenization: Tokenization, tokenizer, texts: list[str], batch_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text, the sum of its hook-point activations over the positions the SAE trained on and how many
    there are: ([n, d_model] fp32, [n]). Texts are tokenized as the SAE's capture did."""
    ids = tokenization.encode(tokenizer, texts)
    skip = tokenization.skip_first_positions
    device = model.tok_embeddings.weight.device
    sums = torch.zeros(len(ids), model.args.dim)
    counts = torch.tensor([max(len(t) - skip, 0) for t in ids])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    start = 0
    while start < len(order):  # length-sorted batches of about batch_tokens padded tokens
        end = start + 1
        while end < len(order) and (end - start + 1) * len(ids[order[end]]) <= batch_tokens:
            end += 1
        part = order[start:end]
        width = max(len(ids[i]) for i in part)
        tokens = torch.zeros(len(part), width, dtype=torch.long)
        valid = torch.zeros(len(part), width, dtype=torch.bool)
        for r, i in enumerate(part):
            tokens[r, : len(ids[i])] = torch.tensor(ids[i])
            valid[r, skip : len(ids[i])] = True
        x = model.capture(tokens.to(device), [hook_point])[hook_point].float().cpu()  # [b, T, d]
        sums[part] = (x * valid[..., None]).sum(1)
        start = end
    return sums, counts


def capture_sums(
    capture, hook_point: str, sentence_ids: list[int], skip_text_positions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """hook_sums' result for sentences a capture already holds (their activations as the SAE's training
    data stored them; BOS is never stored, so only the excluded text positions are skipped)."""
    acts = capture.sentence_activations(hook_point, sentence_ids)
    missing = [s for s in sentence_ids if s not in acts]
    if missing:
        raise KeyError(f"{capture.directory} holds no sentence {missing[0]}")
    rows = [acts[s][skip_text_positions:].float() for s in sentence_ids]
    sums = torch.stack([r.sum(0) for r in rows]) if rows else torch.zeros(0, capture.d_model)
    return sums, torch.tensor([len(r) for r in rows])


def diffmean_directions(
    sums: torch.Tensor, counts: torch.Tensor, positive: list[list[int]], negative: list[list[int]]
) -> torch.Tensor:
    """Unit DiffMean directions [n, d]: for each latent, the token-mean activation over the texts in
    positive[i] minus that over negative[i] (indices into hook_sums' rows)."""
    out = []
    for pos, neg in zip(positive, negative):
        mean_pos = sums[pos].sum(0) / counts[pos].sum().clamp(min=1)
        mean_neg = sums[neg].sum(0) / counts[neg].sum().clamp(min=1)
        out.append(mean_pos - mean_neg)
    return unit_rows(torch.stack(out)) if out else torch.zeros(0, sums.shape[1])


@torch.inference_mode()
def residual_norm(model, hook_point: str, prompts: list[list[int]], skip_first_positions: int) -> float:
    """Mean L2 norm of the stream at the hook over the prompts' positions from `skip_first_positions` on:
    the unit steering strengths are measured in (the sink's outsized norm excluded)."""
    device = model.tok_embeddings.weight.device
    norms = []
    for p in prompts:
        x = model.capture(torch.tensor([p], device=device), [hook_point])[hook_point][0].float()
        norms.append(x[skip_first_positions:].norm(dim=-1))
    return float(torch.cat(norms).mean())
