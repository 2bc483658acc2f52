"""Output scores: does adding a latent's direction make the model predict given tokens?

A latent chosen by its input explanation ("fires on 'closely', 'related'") often does nothing to the
text when steered; one chosen by its output effect does (Arad, Mueller & Belinkov 2025). The cheap
form, for every latent at once, for any number of token sets per latent:

    score(l, S)   mean over a few short prompts of  P_steered(S) - P_clean(S)
                  at the next-token prediction after the prompt, steered by factor x norm x d_l

Two sets per latent in the steering evaluation: promoted(l), the tokens with the highest logit-lens score
of the unit direction d_l (unembedding of the final norm's weight times d_l), which says what the latent
does; and the concept tokens of its meaning (concept_tokens), which says whether what it does is what
it means.

The clean prefix up to the hook runs once per prompt; each latent's steered stream runs only the
blocks after it (Transformer.forward_from), the last position through the output head.
"""

from __future__ import annotations

import torch

from llama_3.errors import PipelineInputError
from llama_3.hooks import HookPoint


def stream_point(hook_point: str, n_layers: int) -> tuple[str, int, bool]:
    """Where adding a vector at `hook_point` adds it to the residual stream: (the stream's hook point, the
    block to resume from, whether it resumes mid-block). resid_pre.L -> block L; resid_post.L and mlp_out.L
    (what the MLP adds to it) -> block L + 1; resid_mid.L and attn_out.L -> block L's MLP."""
    hp = HookPoint.parse(hook_point, n_layers)
    if hp.kind == "resid_pre":
        return hook_point, hp.layer, False
    if hp.kind in ("resid_post", "mlp_out"):
        return f"resid_post.{hp.layer}", hp.layer + 1, False
    if hp.kind in ("resid_mid", "attn_out"):
        return f"resid_mid.{hp.layer}", hp.layer, True
    raise PipelineInputError(
        f"output score: hook point {hook_point} is a norm's output, not added to the stream; it needs a residual, "
        "attn_out or mlp_out hook"
    )


@torch.inference_mode()
def promoted_tokens(model, directions: torch.Tensor, top_tokens: int, chunk_rows: int = 512) -> torch.Tensor:
    """[n, d] unit directions -> [n, top_tokens] token ids with the largest logit-lens score.

    In chunks of rows: the whole [n, V] lens of a users'-size SAE is 49,152 x 128,256 fp32 = 25 GB."""
    w_out = model.output.weight.float()  # [V, d]
    gain = model.norm.weight.float()
    out = []
    for a in range(0, len(directions), chunk_rows):
        lens = (directions[a : a + chunk_rows].float().to(w_out.device) * gain) @ w_out.t()  # [chunk, V]
        out.append(lens.topk(top_tokens, dim=-1).indices)
    return torch.cat(out) if out else torch.zeros(0, top_tokens, dtype=torch.long, device=w_out.device)


def padded(token_sets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token-id lists -> ([n, m] ids, 0 where padded; [n, m] mask), m >= 1."""
    m = max([len(t) for t in token_sets] + [1])
    ids = torch.zeros(len(token_sets), m, dtype=torch.long)
    mask = torch.zeros(len(token_sets), m)
    for i, t in enumerate(token_sets):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = 1.0
    return ids, mask


@torch.inference_mode()
def output_scores(
    model,
    hook_point: str,
    directions: torch.Tensor,
    prompts: list[list[int]],
    strength: float,
    skip_first_positions: int,
    token_sets: list[list[list[int]]],
    batch_rows: int = 128,
    progress=None,
) -> torch.Tensor:
    """[n_sets, n] scores for n unit directions [n, d] added at `strength` (model units) to every prompt
    position from `skip_first_positions` on; token_sets[s][i]: the ids whose probability set s scores for
    direction i (an empty set scores 0)."""
    stream, layer, mid = stream_point(hook_point, model.args.n_layers)
    device = model.tok_embeddings.weight.device
    sets = [tuple(t.to(device) for t in padded(ts)) for ts in token_sets]
    scores = torch.zeros(len(token_sets), len(directions))
    for p in prompts:
        tokens = torch.tensor([p], device=device)
        x = model.capture(tokens, [stream])[stream]  # [1, T, d] in the model's dtype
        clean = model.forward_from(x, layer, last_only=True, mid=mid)[:, 0].float().softmax(-1)  # [1, V]
        steer_at = (torch.arange(len(p), device=device) >= skip_first_positions)[None, :, None]
        for a in range(0, len(directions), batch_rows):
            dirs = directions[a : a + batch_rows].float().to(device)  # [b, d]
            steered_x = torch.where(steer_at, x.float() + strength * dirs[:, None, :], x.float()).to(x.dtype)
            probs = model.forward_from(steered_x, layer, last_only=True, mid=mid)[:, 0].float().softmax(-1)  # [b, V]
            for s, (ids, mask) in enumerate(sets):
                ids, mask = ids[a : a + batch_rows], mask[a : a + batch_rows]  # [b, m]
                gain = ((probs.gather(1, ids) - clean[0, ids]) * mask).sum(1)
                scores[s, a : a + batch_rows] += gain.cpu() / len(prompts)
            if progress is not None:
                progress.update(len(dirs))
    return scores
