"""Output score: does adding a latent's direction make the model predict the tokens the latent promotes?

A latent chosen by its input explanation ("fires on 'closely', 'related'") often does nothing to the
text when steered; one chosen by its output effect does (Arad, Mueller & Belinkov 2025). The cheap
form, for every latent at once:

    promoted(l)   the `top_tokens` tokens with the highest logit-lens score of the unit direction d_l
                  (unembedding of the final norm's weight times d_l)
    score(l)      mean over a few short prompts of  P_steered(promoted(l)) - P_clean(promoted(l))
                  at the next-token prediction after the prompt, steered by factor x norm x d_l

The clean prefix up to the hook runs once per prompt; each latent's steered stream runs only the
blocks after it (Transformer.forward_from), the last position through the output head.
"""

from __future__ import annotations

import torch

from llama_3.errors import PipelineInputError
from llama_3.hooks import HookPoint


def resume_layer(hook_point: str, n_layers: int) -> int:
    """The block whose input the hook point's stream is: resid_pre.L -> L, resid_post.L -> L + 1."""
    hp = HookPoint.parse(hook_point, n_layers)
    if hp.kind == "resid_pre":
        return hp.layer
    if hp.kind == "resid_post":
        return hp.layer + 1
    raise PipelineInputError(
        f"output score: hook point {hook_point} is inside a block; it needs a resid_pre or resid_post hook"
    )


@torch.inference_mode()
def promoted_tokens(model, directions: torch.Tensor, top_tokens: int) -> torch.Tensor:
    """[n, d] unit directions -> [n, top_tokens] token ids with the largest logit-lens score."""
    w_out = model.output.weight.float()  # [V, d]
    lens = (directions.float().to(w_out.device) * model.norm.weight.float()) @ w_out.t()  # [n, V]
    return lens.topk(top_tokens, dim=-1).indices


@torch.inference_mode()
def output_scores(
    model,
    hook_point: str,
    directions: torch.Tensor,
    prompts: list[list[int]],
    strength: float,
    skip_first_positions: int,
    top_tokens: int = 10,
    batch_rows: int = 128,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [n], promoted token ids [n, top_tokens]) for n unit directions [n, d] added at
    `strength` (model units) to every prompt position from `skip_first_positions` on."""
    layer = resume_layer(hook_point, model.args.n_layers)
    device = model.tok_embeddings.weight.device
    promoted = promoted_tokens(model, directions, top_tokens).to(device)
    scores = torch.zeros(len(directions))
    for p in prompts:
        tokens = torch.tensor([p], device=device)
        x = model.capture(tokens, [hook_point])[hook_point]  # [1, T, d] in the model's dtype
        clean = model.forward_from(x, layer, last_only=True)[:, 0].float().softmax(-1)  # [1, V]
        steer_at = (torch.arange(len(p), device=device) >= skip_first_positions)[None, :, None]
        for a in range(0, len(directions), batch_rows):
            dirs = directions[a : a + batch_rows].float().to(device)  # [b, d]
            steered_x = torch.where(steer_at, x.float() + strength * dirs[:, None, :], x.float()).to(x.dtype)
            probs = model.forward_from(steered_x, layer, last_only=True)[:, 0].float().softmax(-1)  # [b, V]
            ids = promoted[a : a + batch_rows]
            gain = probs.gather(1, ids).sum(1) - clean[0, ids].sum(1)
            scores[a : a + batch_rows] += gain.cpu() / len(prompts)
            if progress is not None:
                progress.update(len(dirs))
    return scores, promoted.cpu()
