"""Other tools' SAE folders, read and written in one place: SAELens (6.x) and EleutherAI sparsify, and
`load_sae`, which reads any of them or ours; a suite of SAELens folders (Llama Scope's layout, one folder per SAE
named by its Llama Scope-style id, and our index.json beside them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file

from llama_3.errors import PipelineInputError
from llama_3.hooks import HookPoint
from pipeline.core.manifest import sha256_file, write_json_atomic
from pipeline.core.tokenization import DEFAULT_MAX_TOKENS
from pipeline.sae.model import SAE_CONFIG, SAE_WEIGHTS, SaeConfig, TopKSae, write_sae_folder
from pipeline.sae.training_run import SAE_SUBDIR

SAELENS_WEIGHTS = "sae_weights.safetensors"
WEIGHT_FILES = (SAE_WEIGHTS, SAELENS_WEIGHTS)  # ours and sparsify's; SAELens'
_SHA256: dict[tuple, str] = {}


def sae_weights_file(sae_dir: str | Path) -> Path:
    """The SAE folder's weights (ours, sparsify's or SAELens' name); the first name when there are none."""
    for name in WEIGHT_FILES:
        if (Path(sae_dir) / name).is_file():
            return Path(sae_dir) / name
    return Path(sae_dir) / WEIGHT_FILES[0]


def sae_sha256(sae_dir: str | Path) -> str:
    """What ties meanings, top sentences and evaluations to one SAE: the sha256 of its weights file.
    Hashed once per process and file version (a 1.2 GB read at 49k latents x d_model 3,072): later calls,
    and `load_sae`'s `sae.sha256`, reuse it while the file's size and mtime are unchanged."""
    path = sae_weights_file(sae_dir).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = sha256_file(path)
    return _SHA256[key]


NormWeight = torch.Tensor | Mapping[int, torch.Tensor] | None
"""The ffn_norm RMSNorm weight [d] a SAELens transcoder on ln2.hook_normalized needs to import: one tensor, or
{layer: weight} (a suite's)."""


def load_sae(directory: str | Path, device: str | torch.device = "cpu", *, norm_weight: NormWeight = None) -> TopKSae:
    """The SAE in `directory`, whichever layout it has (ours, SAELens', sparsify's), with `sae.sha256` (its
    weights file's, computed here once) and `sae.directory` set. `norm_weight`: see load_saelens."""
    sae = _read_sae(Path(directory), device, norm_weight)
    sae.directory = Path(directory)
    sae.sha256 = sae_sha256(directory)
    return sae


def _read_sae(directory: Path, device: str | torch.device, norm_weight: NormWeight = None) -> TopKSae:
    try:
        raw = json.loads((directory / SAE_CONFIG).read_text())
        if isinstance(raw, dict) and "d_sae" in raw:
            if not (directory / SAELENS_WEIGHTS).is_file():
                raise PipelineInputError(f"{directory / SAELENS_WEIGHTS}: file not found (SAELens' cfg.json is there)")
            return load_saelens(directory, raw, device, norm_weight=norm_weight)
        if isinstance(raw, dict) and "d_in" in raw and "d_model" not in raw:
            return load_sparsify(directory, raw, device)
        cfg = SaeConfig(**raw)
    except FileNotFoundError:
        if (directory / SAE_SUBDIR / SAE_CONFIG).is_file():  # the training run's folder: the SAE is inside it
            raise PipelineInputError(
                f"{directory}: a training run folder, not an SAE; the SAE is {directory / SAE_SUBDIR}"
            ) from None
        if (directory / SUITE_INDEX).is_file() or _suite_folders(directory):  # several SAEs, one per subfolder
            raise PipelineInputError(
                f"{directory}: a suite of SAEs (one per subfolder), not one SAE; load one of its subfolders, "
                "or all of them with load_saelens_suite"
            ) from None
        raise PipelineInputError(f"{directory / SAE_CONFIG}: file not found (not an SAE folder?)") from None
    except PipelineInputError as e:  # a check of the config's values (SaeConfig's own name no file): name it
        raise PipelineInputError(str(e) if str(directory) in str(e) else f"{directory / SAE_CONFIG}: {e}") from None
    except (TypeError, KeyError, ValueError) as e:  # JSONDecodeError is a ValueError; KeyError: a missing field
        raise PipelineInputError(f"{directory / SAE_CONFIG}: not an SAE config ({type(e).__name__}: {e})") from None
    sae = TopKSae(cfg)
    try:
        sd = load_file(str(directory / SAE_WEIGHTS))
    except Exception as e:
        raise PipelineInputError(
            f"{directory / 'sae.safetensors'}: cannot be read ({str(e).splitlines()[0]})"
        ) from None
    missing, unexpected = sae.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise PipelineInputError(f"{directory / SAE_WEIGHTS}: weights {missing or unexpected} do not match cfg.json")
    return sae.to(device)


def load_sparsify(directory: Path, raw: dict, device: str | torch.device = "cpu") -> TopKSae:
    """(From load, with `raw` its parsed cfg.json.) An SAE in EleutherAI sparsify's layout
    (SparseCoder.save_to_disk: cfg.json with d_in, num_latents
    or expansion_factor, k; sae.safetensors with encoder.weight [L, d], encoder.bias, W_dec [L, d],
    b_dec), for inference: the same forward on raw activations (normalize "none"). sparsify names a
    hookpoint by its folder: "layers.N" is the output of decoder layer N, our resid_post.N. It records
    no model, BOS or excluded positions: pass --model (one of another width is refused);
    add_bos / exclude_first_positions stay 0."""
    where = directory / SAE_CONFIG
    if raw.get("activation", "topk") != "topk" or raw.get("transcode") or raw.get("skip_connection"):
        raise PipelineInputError(
            f"{where}: a sparsify {raw.get('activation')} coder (transcode {raw.get('transcode')}, skip "
            f"{raw.get('skip_connection')}); only plain TopK SAEs import"
        )
    match = re.fullmatch(r"layers\.(\d+)", directory.name)
    if match is None:
        raise PipelineInputError(
            f"{directory}: a sparsify SAE is named by its hookpoint folder (layers.N, a layer's output); "
            f"{directory.name!r} is not one"
        )
    d_in = int(raw["d_in"])
    n_latents = int(raw.get("num_latents") or d_in * int(raw.get("expansion_factor", 32)))
    cfg = SaeConfig(
        d_model=d_in,
        n_latents=n_latents,
        k=int(raw.get("k", 32)),
        normalize="none",
        hook_point=f"resid_post.{match[1]}",
        model={"d_model": d_in, "source": "sparsify"},  # a model of another width is refused, not run
    )
    names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_pre": "b_dec"}
    weights = read_weights(directory / SAE_WEIGHTS, names, "sparsify's")
    return TopKSae.from_weights(cfg, weights, directory / SAE_WEIGHTS, device)


def saelens_hook_point(name: object, where: Path, key: str = "hook_name") -> tuple[str, str]:
    """A SAELens hook name (blocks.L.<hook>) -> (our hook point, the hook's name inside the block); one that is
    none of ours is one line naming `where` and the metadata `key`."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", str(name))
    if match is None or match[2] not in IMPORT_HOOKS:
        raise PipelineInputError(
            f"{where}: {key} {name!r} is not a residual-stream hook of ours (blocks.L. + {', '.join(IMPORT_HOOKS)})"
        )
    return f"{IMPORT_HOOKS[match[2]]}.{match[1]}", match[2]


def norm_vector(norm_weight: torch.Tensor | None, d: int, layer: int, why: str) -> torch.Tensor:
    """The ffn_norm weight a transcoder's SAELens form folds in or out, as an fp32 vector [d]; missing or of
    another width: one line, `why` first."""
    if norm_weight is None:
        raise PipelineInputError(f"{why}: pass norm_weight (the model's layers[{layer}].ffn_norm.weight)")
    w = norm_weight.detach().float().cpu().reshape(-1)
    if len(w) != d:
        raise PipelineInputError(f"{why}: norm_weight has {len(w)} entries, not {d}")
    return w


def _norm_weight_for(norm_weight: NormWeight, meta, layer: int, where: Path, d: int) -> torch.Tensor:
    """The ffn_norm weight [d] of `layer`: the caller's, else the one our export recorded in the metadata."""
    if isinstance(norm_weight, Mapping):
        norm_weight = norm_weight.get(layer)
    if norm_weight is None and meta.get(FOLDED_NORM_KEY) is not None:
        norm_weight = torch.tensor(meta.get(FOLDED_NORM_KEY), dtype=torch.float32)
    w = norm_vector(
        norm_weight,
        d,
        layer,
        f"{where}: a transcoder on {TRANSCODER_INPUT_HOOK} (before the RMSNorm weight) imports with the weight "
        "unfolded",
    )
    if bool((w == 0).any()):
        raise PipelineInputError(
            f"{where}: the RMSNorm weight has {int((w == 0).sum())} zero entries: W_enc cannot be divided by it"
        )
    return w


def load_saelens(
    directory: Path, raw: dict, device: str | torch.device = "cpu", *, norm_weight: NormWeight = None
) -> TopKSae:
    """(From load, with `raw` its parsed cfg.json.) A TopK, JumpReLU or standard (ReLU) SAE, or a (skip)
    transcoder, ReLU or JumpReLU, in SAELens' layout (SAE.save_model: cfg.json with
    `metadata`, sae_weights.safetensors with W_enc [d, L], b_enc, W_dec [L, d], b_dec, JumpReLU's
    threshold [L], a skip transcoder's W_skip [d_out, d_in]), for inference: the same forward on raw activations.
    Gemma Scope and Llama Scope SAEs arrive this way: SAE.from_pretrained(release, id) converts them (and folds
    Llama Scope's input norm), save_model writes this layout. What it must be fed comes from the metadata:
    hook_name (blocks.L.hook_resid_pre / _mid / _post, hook_attn_out, hook_mlp_out; hook_mlp_in is resid_mid,
    HookedSAETransformer's mlp.hook_in is ffn_norm), prepend_bos, context_size, seqpos_slice [start, None].

    A transcoder reads hook_name and writes hook_name_out (e.g. ffn_norm.L -> mlp_out.L). SAELens' Gemma Scope
    transcoders, and ours exported, read blocks.L.ln2.hook_normalized: the RMSNorm's output before its weight w,
    where our ffn_norm.L = hook_normalized * w. W_enc (and W_skip) are divided by w to read ffn_norm.L instead:
    `norm_weight` (the model's layers[L].ffn_norm.weight, or {layer: weight}), else the weight our export
    recorded in the metadata; a weight with a zero entry cannot be divided out and is refused. A TopK SAE with
    rescale_acts_by_decoder_norm (TopK on pre-activation x ||W_dec[i]||) imports with the norms folded into the
    encoder (unit decoder rows, a plain TopK on SAELens' own latent values)."""
    where = directory / SAE_CONFIG
    meta = raw.get("metadata") or raw  # SAELens < 6 kept these keys at the top level
    arch = raw.get("architecture") or ("topk" if raw.get("activation_fn") == "topk" else "standard")
    if arch not in ("topk", "jumprelu", "standard", *SAELENS_TRANSCODERS):
        raise PipelineInputError(
            f"{where}: a SAELens {arch!r} SAE; only topk, jumprelu and standard SAEs and "
            f"{' / '.join(SAELENS_TRANSCODERS)} import"
        )
    transcoder, skip = arch in SAELENS_TRANSCODERS, arch.endswith("skip_transcoder")
    jumprelu = arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")
    if raw.get("activation_fn", "relu") not in ("relu", "topk"):
        raise PipelineInputError(f"{where}: activation_fn {raw.get('activation_fn')!r}; only relu (or topk) imports")
    if raw.get("normalize_activations", "none") != "none" or raw.get("reshape_activations", "none") != "none":
        raise PipelineInputError(
            f"{where}: normalize_activations {raw.get('normalize_activations')!r} / reshape_activations "
            f"{raw.get('reshape_activations')!r}; only SAEs on raw activations import"
        )
    hook_point, hook = saelens_hook_point(meta.get("hook_name"), where)
    output_hook_point = ""
    if transcoder:
        output_hook_point = saelens_hook_point(meta.get("hook_name_out"), where, "hook_name_out")[0]
        src, dst = HookPoint.parse(hook_point), HookPoint.parse(output_hook_point)
        if dst.layer != src.layer or dst.stage <= src.stage:
            raise PipelineInputError(
                f"{where}: a transcoder from {meta.get('hook_name')} to {meta.get('hook_name_out')}; ours read an "
                "earlier hook point of the block they write (e.g. ln2.hook_normalized -> hook_mlp_out)"
            )
        if int(raw.get("d_out", raw["d_in"])) != int(raw["d_in"]):
            raise PipelineInputError(f"{where}: d_out {raw['d_out']} != d_in {raw['d_in']}; ours map d_model to itself")
    elif hook == TRANSCODER_INPUT_HOOK:
        raise PipelineInputError(
            f"{where}: an SAE on {meta.get('hook_name')} (the RMSNorm output before its weight), which no hook "
            "point of ours holds; only transcoders from it import"
        )
    add_bos = bool(meta.get("prepend_bos", True))
    start = (meta.get("seqpos_slice") or [None])[0] or 0
    context = meta.get("context_size")
    identity = meta.get("model_identity")  # our export's: the model's hashes, so a different model is refused
    model = {**(identity if isinstance(identity, dict) else {}), "source": "saelens", "name": meta.get("model_name")}
    try:
        cfg = SaeConfig(
            d_model=int(raw["d_in"]),
            n_latents=int(raw["d_sae"]),
            k=int(raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k", 0)) if arch == "topk" else 0,
            activation="topk" if arch == "topk" else "jumprelu",  # ReLU = JumpReLU at threshold 0
            normalize="none",
            hook_point=hook_point,
            output_hook_point=output_hook_point,
            skip=skip,
            model={**model, "d_model": int(raw["d_in"])},
            add_bos=add_bos,
            exclude_first_positions=max(0, int(start) - int(add_bos)),
            max_tokens=int(context) - int(add_bos) if context else DEFAULT_MAX_TOKENS,
        )
    except PipelineInputError as e:
        raise PipelineInputError(f"{where}: {e}") from None
    path = directory / SAELENS_WEIGHTS
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if jumprelu else ()) + (("W_skip",) if skip else ())
    w = read_weights(path, {k: k for k in names}, "SAELens'")
    w_enc, b_enc, w_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    rescale = bool(raw.get("rescale_acts_by_decoder_norm"))
    if rescale and arch != "topk" and not torch.allclose(w_dec.norm(dim=1), torch.ones(1), atol=1e-4):
        raise PipelineInputError(f"{where}: rescale_acts_by_decoder_norm with non-unit decoder rows does not import")
    if not transcoder and not raw.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
    if rescale and arch == "topk":  # pre' = pre * n_i, TopK of pre', decoded by W_dec[i] / n_i: fold n into both
        n = w_dec.norm(dim=1)  # [L]
        w_enc, b_enc, w_dec = w_enc * n, b_enc * n, w_dec / n.clamp_min(1e-30)[:, None]
    weights = {"W_enc": w_enc.t(), "b_enc": b_enc, "W_dec": w_dec, "b_pre": b_dec}
    if skip:
        weights["W_skip"] = w["W_skip"]
    if hook == TRANSCODER_INPUT_HOOK:  # it reads n = x / w: W_enc n = (W_enc / w) x, likewise W_skip
        g = _norm_weight_for(norm_weight, meta, HookPoint.parse(hook_point).layer, where, cfg.d_model)
        weights["W_enc"] = weights["W_enc"] / g
        if skip:
            weights["W_skip"] = weights["W_skip"] / g
    if cfg.activation == "jumprelu":
        weights["threshold"] = w["threshold"] if jumprelu else torch.zeros(cfg.n_latents)
    return TopKSae.from_weights(cfg, weights, path, device)


def export_scale(sae: TopKSae, tool: str) -> float:
    """The input scale s an export folds into the weights (1 without normalisation); the other tools have
    no per-token standardisation, so such an SAE is refused."""
    if sae.cfg.normalize == "token":
        raise PipelineInputError(f"{tool} has no per-token standardisation; export needs normalize=dataset or none")
    return sae.cfg.input_scale if sae.cfg.normalize == "dataset" else 1.0


def saelens_hooks(sae: TopKSae, unit_decoder: bool = False) -> tuple[str, str | None]:
    """(hook_name, hook_name_out) of the SAE's SAELens export (None: an SAE, which writes where it reads); what
    SAELens cannot hold is refused here, before anything is written, with one line."""
    cfg = sae.cfg
    hook = HookPoint.parse(cfg.hook_point, flag=f"SAE hook point {cfg.hook_point!r}")
    if not cfg.is_transcoder:
        if hook.kind not in TRANSFORMERLENS_HOOKS:
            raise PipelineInputError(
                f"SAE at {hook}: TransformerLens has no hook for the RMSNorm output after its weight "
                "(ln*.hook_normalized comes before it); SAELens export needs a resid_pre / resid_mid / resid_post / "
                "attn_out / mlp_out SAE"
            )
        return f"blocks.{hook.layer}.{TRANSFORMERLENS_HOOKS[hook.kind]}", None
    out = HookPoint.parse(cfg.output_hook_point, flag=f"transcoder output {cfg.output_hook_point!r}")
    where = f"transcoder {hook} -> {out}"
    if cfg.activation != "jumprelu":
        raise PipelineInputError(
            f"{where}: a TopK transcoder, and SAELens has no TopK transcoder (only ReLU / JumpReLU ones): convert "
            "it to JumpReLU first (python sae.py jumprelu) and export that"
        )
    if unit_decoder:
        raise PipelineInputError(f"{where}: --unit-decoder is for SAEs (sae-dashboard's); export it without")
    if hook.kind == "ffn_norm":
        hook_name = f"blocks.{hook.layer}.{TRANSCODER_INPUT_HOOK}"
    elif hook.kind in TRANSFORMERLENS_HOOKS:
        hook_name = f"blocks.{hook.layer}.{TRANSFORMERLENS_HOOKS[hook.kind]}"
    else:
        raise PipelineInputError(f"{where}: TransformerLens has no hook for {hook.kind} after its RMSNorm weight")
    if out.kind not in TRANSFORMERLENS_HOOKS:
        raise PipelineInputError(f"{where}: TransformerLens has no hook for {out.kind} after its RMSNorm weight")
    return hook_name, f"blocks.{out.layer}.{TRANSFORMERLENS_HOOKS[out.kind]}"


def export_saelens(
    sae: TopKSae, directory: str | Path, unit_decoder: bool = False, norm_weight: torch.Tensor | None = None
) -> dict:
    """SAELens 6.x's layout (SAE.load_from_disk): W_enc [d, L], W_dec [L, d], b_enc, b_dec; a TopK SAE
    (a JumpReLU one with its threshold), or a JumpReLU (skip) transcoder. Returns the cfg.json written.

    SAELens' encoder has no separate b_pre: its b_dec is subtracted from the input, as ours is. The
    input scale s is folded so the exported SAE works on raw activations: by default into the decoder
    (rows of norm 1/s, our latent values exactly); with unit_decoder into the biases instead (unit rows,
    latents ours / s, `rescale_acts_by_decoder_norm: true`: what sae-dashboard's W_dec-norm folding
    accepts). A TopK SAE that ranks by decoder norm (Llama Scope's topk_by_decoder_norm) is SAELens' TopK
    with rescale_acts_by_decoder_norm: its TopK of pre x ||W_dec[i]|| picks the same latents (the fold divides
    every norm by the same s) and its decode divides the norms back out. The metadata carries what the SAE must
    be fed: the TransformerLens hook of its hook kind (attn_out / mlp_out: hook_attn_out / hook_mlp_out, what the
    sub-block adds to the stream), context_size and prepend_bos of the capture, and `seqpos_slice` [first trained
    position, None] (BOS and the excluded sink positions left out, as our splice leaves them).

    A transcoder exports only as JumpReLU (SAELens has no TopK transcoder), as jumprelu_transcoder, or
    jumprelu_skip_transcoder with W_skip [d_out, d_in]; apply_b_dec_to_input false (its b_dec is the output's
    bias, as our b_pre), hook_name_out its target (blocks.L.hook_mlp_out). An ffn_norm.L transcoder reads
    blocks.L.ln2.hook_normalized, as SAELens' Gemma Scope transcoders do: TransformerLens' RMSNorm output before
    its weight w (`norm_weight`, the model's layers[L].ffn_norm.weight), ffn_norm.L = hook_normalized * w. With
    x̃ = s_in w n and ŷ = ŷ̃ / s_out:
        pre = W_enc x̃ + b_enc = (W_enc diag(s_in w)) n + b_enc        W_enc' = (W_enc * s_in w)^T; b_enc, threshold
        ŷ   = (W_dec^T h + b_pre + W_skip x̃) / s_out                   W_dec' = W_dec / s_out, b_dec' = b_pre / s_out,
                                                                        W_skip' = W_skip * s_in w / s_out
    so the latents are ours exactly. The metadata records w (`ffn_norm_weight_folded`) for the import back.
    """
    cfg = sae.cfg
    s = export_scale(sae, "SAELens")
    hook_name, hook_name_out = saelens_hooks(sae, unit_decoder)
    if cfg.is_transcoder:
        tensors, folded = _transcoder_tensors(sae, s, norm_weight)
    else:
        tensors, folded = _sae_tensors(sae, s, unit_decoder), None
    tokenization = cfg.tokenization
    model = dict(cfg.model or {})
    skip = "_skip" if cfg.skip else ""
    out = {
        "architecture": f"jumprelu{skip}_transcoder" if cfg.is_transcoder else cfg.activation,
        "d_in": cfg.d_model,
        "d_sae": cfg.n_latents,
        **({"d_out": cfg.d_model} if cfg.is_transcoder else {}),
        **({"k": cfg.k} if cfg.activation == "topk" else {}),
        **({} if cfg.is_transcoder else {"rescale_acts_by_decoder_norm": unit_decoder or _ranks_by_norm(cfg)}),
        "apply_b_dec_to_input": not cfg.is_transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained here, not by SAELens
            "hook_name": hook_name,
            **({"hook_name_out": hook_name_out} if hook_name_out else {}),
            # a name, not a local path; the full identity (hashes of config and tokenizer) beside it
            "model_name": Path(model["path"]).stem if model.get("path") else None,
            "model_identity": model,
            "context_size": tokenization.sequence_tokens,
            "prepend_bos": tokenization.add_bos,
            "seqpos_slice": [tokenization.skip_first_positions, None],
            "exported_by": "llama-sae sae.py",
            **({FOLDED_NORM_KEY: folded.tolist()} if folded is not None else {}),
        },
    }
    write_sae_folder(directory, SAELENS_WEIGHTS, tensors, out)
    return out


def _ranks_by_norm(cfg: SaeConfig) -> bool:
    return cfg.activation == "topk" and cfg.topk_by_decoder_norm


def _sae_tensors(sae: TopKSae, s: float, unit_decoder: bool) -> dict[str, torch.Tensor]:
    """An SAE's SAELens tensors with the input scale s folded (export_saelens)."""
    norms = sae.W_dec.detach().norm(dim=1)
    if unit_decoder and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise PipelineInputError(
            f"--unit-decoder: this SAE's decoder rows are not unit norm (range {float(norms.min()):.4g}.."
            f"{float(norms.max()):.4g}; an imported SAE?); export it without --unit-decoder"
        )
    if unit_decoder:  # pre' = W_enc (x - b_pre / s) + b_enc / s = pre / s; x̂ = W_dec^T h' + b_pre / s
        w_enc, b_enc, w_dec = sae.W_enc.detach(), sae.b_enc.detach() / s, sae.W_dec.detach()
    else:  # pre = (s W_enc)(x - b_pre / s) + b_enc;  x̂ = (W_dec / s)^T h + b_pre / s
        w_enc, b_enc, w_dec = sae.W_enc.detach() * s, sae.b_enc.detach(), sae.W_dec.detach() / s
    tensors = {"W_enc": w_enc.t(), "W_dec": w_dec, "b_enc": b_enc, "b_dec": sae.b_pre.detach() / s}
    if sae.cfg.activation == "jumprelu":  # compared with pre-activations, which unit_decoder divides by s
        tensors["threshold"] = sae.threshold.detach() / (s if unit_decoder else 1.0)
    return tensors


def _transcoder_tensors(
    sae: TopKSae, s_in: float, norm_weight: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A JumpReLU transcoder's SAELens tensors on raw activations, and the RMSNorm weight folded in (None when it
    reads no RMSNorm output); the fold is export_saelens'."""
    cfg = sae.cfg
    d = cfg.d_model
    s_out = cfg.output_scale if cfg.normalize == "dataset" else 1.0
    folded = None
    layer = _norm_layer(cfg)
    if layer is not None:
        where = (
            f"transcoder at {cfg.hook_point}: its SAELens export reads ln2.hook_normalized, before the RMSNorm weight"
        )
        folded = norm_vector(norm_weight, d, layer, where)
    col = s_in * (folded if folded is not None else torch.ones(d))  # [d_in] what multiplies each raw input entry
    tensors = {
        "W_enc": (sae.W_enc.detach() * col).t(),  # [d_in, L]
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach() / s_out,  # [L, d_out]
        "b_dec": sae.b_pre.detach() / s_out,
        "threshold": sae.threshold.detach(),  # the pre-activations are ours exactly
    }
    if cfg.skip:
        tensors["W_skip"] = sae.W_skip.detach() * col / s_out  # [d_out, d_in]
    return tensors, folded


def export_sparsify(sae: TopKSae, directory: str | Path) -> None:
    """sparsify's own layout, loadable by SparseCoder.load_from_disk: encoder.weight [L, d], encoder.bias,
    W_dec [L, d], b_dec [d] + cfg.json (d_in, num_latents, k, ...), on raw activations.

    The dataset scale s is folded so that the decoder rows stay unit norm (sparsify's normalize_decoder):
    pre' = W_enc (x - b_pre / s) + b_enc / s = pre / s, so the same latents fire with activations
    ours / s, and x̂ = W_dec^T h' + b_pre / s is our reconstruction. Steering strengths scale by 1 / s.
    """
    s = export_scale(sae, "sparsify")
    if sae.cfg.activation != "topk":
        raise PipelineInputError(f"sparsify's coders are TopK; a {sae.cfg.activation} SAE does not export to it")
    tensors = {
        "encoder.weight": sae.W_enc,
        "encoder.bias": sae.b_enc / s,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_pre / s,
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.cfg.n_latents // sae.cfg.d_model),
        "normalize_decoder": True,
        "num_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.cfg.d_model,
    }
    write_sae_folder(directory, SAE_WEIGHTS, tensors, cfg)


SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose cfg.json layout export_saelens writes (6.x: a `metadata` block)."""


TRANSFORMERLENS_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
"""Our hook kinds -> TransformerLens' hook in blocks.<layer> (the value at each is the same tensor; attn_out /
mlp_out: what the attention / MLP sub-block adds to the residual stream)."""

TRANSCODER_INPUT_HOOK = "ln2.hook_normalized"
"""Where an ffn_norm.L transcoder reads in TransformerLens (blocks.L.<this>): ln2's output before its weight w
(ffn_norm.L = hook_normalized * w), as SAELens' Gemma Scope transcoders do; the export folds w into W_enc."""

IMPORT_HOOKS = {
    **{tl: ours for ours, tl in TRANSFORMERLENS_HOOKS.items()},
    "hook_mlp_in": "resid_mid",  # the MLP sub-block's input before ln2: resid_mid (Gemma Scope 2's transcoders)
    "mlp.hook_in": "ffn_norm",  # HookedSAETransformer's MLP input: ln2's output after its weight
    TRANSCODER_INPUT_HOOK: "ffn_norm",  # before the weight: transcoders only, the weight divided out
}
"""TransformerLens hooks in blocks.<layer> that import -> our hook kind."""

SAELENS_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
"""SAELens' transcoder architectures (sae_lens/saes/transcoder.py): ReLU or JumpReLU, with a skip or not."""

FOLDED_NORM_KEY = "ffn_norm_weight_folded"
"""Our export's metadata key: the RMSNorm weight folded into an ln2.hook_normalized transcoder's W_enc."""


def read_weights(path: Path, names: dict[str, str], layout: str) -> dict[str, torch.Tensor]:
    """{our name: fp32 tensor} from a safetensors file that stores them under `names` (ours -> its);
    an unreadable file or a missing tensor is one line naming the file."""
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise PipelineInputError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None
    try:
        return {ours: sd[theirs].float() for ours, theirs in names.items()}
    except KeyError as e:
        raise PipelineInputError(f"{path}: no {e} (not {layout} layout)") from None


def sparsify_hookpoint(hook_point: str) -> str:
    """sparsify's name for where an SAE reads: "layers.N" is decoder layer N's output, our resid_post.N and
    resid_pre.N+1 (the same tensor)."""
    hp = HookPoint.parse(hook_point, flag=f"SAE hook point {hook_point!r}")
    if hp.kind == "resid_post":
        return f"layers.{hp.layer}"
    if hp.kind == "resid_pre" and hp.layer > 0:
        return f"layers.{hp.layer - 1}"
    raise PipelineInputError(
        f"SAE at {hook_point}: sparsify names a layer's output (layers.N); "
        "export needs resid_post.N or resid_pre.N (N >= 1)"
    )


SUITE_INDEX = "index.json"
"""A suite folder's list of its SAEs (export_saelens_suite); one SAELens folder per SAE beside it."""
SUITE_FORMAT = "llama-sae saelens-suite"
LLAMA_SCOPE_SITES = {"resid_post": "R", "attn_out": "A", "mlp_out": "M"}
"""Llama Scope's site letters (ids L{layer}{site}-{expansion}x); its transcoders ffn_norm.L -> mlp_out.L are TC."""


def llama_scope_id(cfg: SaeConfig) -> str:
    """The SAE's Llama Scope-style id, its folder name in a suite: L{layer}{site}-{width}, width {n}x for
    n_latents = n x d_model, else the latent count (L3R-1000). Sites: R for resid_post.L and for resid_pre.L+1
    (the same tensor: Llama Scope names a layer's output), A attn_out.L, M mlp_out.L, TC a transcoder
    ffn_norm.L -> mlp_out.L. Llama Scope names nothing else, so other SAEs spell their hook kind out:
    L{layer}-{kind}-{width} (resid_pre.0, the embeddings, is L0-resid_pre-8x; resid_mid, attn_norm, ffn_norm
    SAEs likewise), other transcoders L{layer}-{kind}-to-{output kind}-{width}."""
    hp = HookPoint.parse(cfg.hook_point, flag=f"SAE hook point {cfg.hook_point!r}")
    width = f"{cfg.n_latents // cfg.d_model}x" if cfg.n_latents % cfg.d_model == 0 else str(cfg.n_latents)
    if cfg.is_transcoder:
        out = HookPoint.parse(cfg.output_hook_point, flag=f"transcoder output {cfg.output_hook_point!r}")
        if (hp.kind, out.kind, out.layer) == ("ffn_norm", "mlp_out", hp.layer):
            return f"L{hp.layer}TC-{width}"
        return f"L{hp.layer}-{hp.kind}-to-{out.kind if out.layer == hp.layer else out.name}-{width}"
    if hp.kind == "resid_pre" and hp.layer > 0:
        return f"L{hp.layer - 1}R-{width}"
    if hp.kind in LLAMA_SCOPE_SITES:
        return f"L{hp.layer}{LLAMA_SCOPE_SITES[hp.kind]}-{width}"
    return f"L{hp.layer}-{hp.kind}-{width}"


def _norm_layer(cfg: SaeConfig) -> int | None:
    """The layer whose ffn_norm weight the SAELens export folds in (a transcoder reading ffn_norm), else None."""
    hp = HookPoint.parse(cfg.hook_point, flag=f"SAE hook point {cfg.hook_point!r}")
    return hp.layer if cfg.is_transcoder and hp.kind == "ffn_norm" else None


def _named(sae: TopKSae) -> str:
    return str(sae.directory) if sae.directory is not None else f"the SAE at {sae.cfg.hook_point}"


def check_saelens_suite(saes: Sequence[TopKSae]) -> dict[str, TopKSae]:
    """{Llama Scope-style id: SAE} of a suite to export; two SAEs with one id (the same site and width), or one
    SAELens cannot hold, is one line (what export_saelens_suite checks before it writes anything, but the norm
    weights, which a caller may load after this)."""
    if not saes:
        raise PipelineInputError("suite: no SAEs to export")
    by_id: dict[str, TopKSae] = {}
    for sae in saes:
        sae_id = llama_scope_id(sae.cfg)
        if sae_id in by_id:
            raise PipelineInputError(
                f"suite: {_named(by_id[sae_id])} and {_named(sae)} are both {sae_id} (one SAE per site and width)"
            )
        by_id[sae_id] = sae
        export_scale(sae, "SAELens")
        saelens_hooks(sae)
    return by_id


def export_saelens_suite(
    saes: Sequence[TopKSae], directory: str | Path, norm_weights: Mapping[int, torch.Tensor] | None = None
) -> list[dict]:
    """A suite of SAEs as Llama Scope ships one: directory/<id>/ a SAELens folder per SAE (export_saelens), named
    by llama_scope_id, and directory/index.json listing them ({id, folder, architecture, hook_name,
    hook_name_out, d_in, d_sae, k, hook_point, output_hook_point, model_identity, source, source_sha256}), which
    load_saelens_suite reads back. `norm_weights`: {layer: the model's layers[layer].ffn_norm.weight} for the
    transcoders reading ffn_norm. Every SAE is checked before the first folder is written: two with one id (the
    same site and width), or one SAELens cannot hold, is one line. Returns index.json's entries."""
    directory = Path(directory)
    norm_weights = norm_weights or {}
    by_id = check_saelens_suite(saes)
    for sae in saes:
        layer = _norm_layer(sae.cfg)
        if layer is not None and layer not in norm_weights:
            raise PipelineInputError(
                f"suite: {_named(sae)} is a transcoder on ffn_norm.{layer}: its export folds in the RMSNorm weight "
                f"of layer {layer}, which norm_weights lacks"
            )
    entries = []
    for sae_id, sae in by_id.items():
        layer = _norm_layer(sae.cfg)
        written = export_saelens(sae, directory / sae_id, norm_weight=None if layer is None else norm_weights[layer])
        meta = written["metadata"]
        entries.append(
            {
                "id": sae_id,
                "folder": sae_id,
                "architecture": written["architecture"],
                "hook_name": meta["hook_name"],
                "hook_name_out": meta.get("hook_name_out"),
                "d_in": sae.cfg.d_model,
                "d_sae": sae.cfg.n_latents,
                "k": sae.cfg.k if sae.cfg.activation == "topk" else None,
                "hook_point": sae.cfg.hook_point,
                "output_hook_point": sae.cfg.output_hook_point,
                "model_identity": meta["model_identity"],
                "source": None if sae.directory is None else str(sae.directory),
                "source_sha256": sae.sha256,  # the weights it was exported from (load_sae sets it)
            }
        )
    index = {"format": SUITE_FORMAT, "sae_lens_version": SAELENS_FORMAT_VERSION, "saes": entries}
    write_json_atomic(directory / SUITE_INDEX, index)
    return entries


def _suite_folders(directory: Path) -> list[Path]:
    """The immediate subfolders holding a cfg.json, by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and (p / SAE_CONFIG).is_file())


def _suite_index(directory: Path) -> dict[str, tuple[Path, dict]]:
    """{id: (its folder, its index.json entry)} from directory/index.json; a broken index is one line."""
    index = directory / SUITE_INDEX
    try:
        listed = json.loads(index.read_text())["saes"]
        entries = {str(e["id"]): (directory / str(e["folder"]), e) for e in listed}
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise PipelineInputError(f"{index}: not a suite index ({type(e).__name__}: {e})") from None
    if len(entries) != len(listed):
        raise PipelineInputError(f"{index}: lists an id twice")
    return entries


def load_saelens_suite(
    directory: str | Path, device: str | torch.device = "cpu", norm_weights: Mapping[int, torch.Tensor] | None = None
) -> dict[str, TopKSae]:
    """Every SAE of a suite folder, by id: the folders our index.json lists (export_saelens_suite; each SAE's
    hook points checked against it), else every immediate subfolder holding a cfg.json, keyed by its name (a
    Llama Scope-style folder of SAELens SAEs: L15R-8x/, L15A-8x/, ...). Each loads as load_sae does (ours,
    SAELens' or sparsify's layout); `norm_weights` {layer: ffn_norm weight} for SAELens transcoders on
    ln2.hook_normalized that our export did not write (load_saelens). A broken folder is one line naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineInputError(f"{directory}: not a folder (a suite is a folder of SAE folders)")
    if (directory / SUITE_INDEX).is_file():
        listed = _suite_index(directory)
    else:
        shipped = [p.name for p in sorted(directory.iterdir()) if (p / "hyperparams.json").is_file()]
        if shipped and not all((directory / name / SAE_CONFIG).is_file() for name in shipped):
            raise PipelineInputError(
                f"{directory / shipped[0]}: Llama Scope's shipped layout (hyperparams.json, checkpoints/); convert it "
                "with SAELens first: SAE.from_pretrained(release, id).save_model(folder)"
            )
        listed = {p.name: (p, {}) for p in _suite_folders(directory)}
    if not listed:
        hint = " (one SAE: load_sae)" if (directory / SAE_CONFIG).is_file() else ""
        raise PipelineInputError(f"{directory}: no {SUITE_INDEX} and no subfolder with a {SAE_CONFIG}{hint}")
    saes: dict[str, TopKSae] = {}
    for sae_id, (folder, entry) in listed.items():
        try:
            sae = load_sae(folder, device, norm_weight=norm_weights)
        except PipelineInputError as e:
            raise PipelineInputError(str(e) if str(folder) in str(e) else f"{folder}: {e}") from None
        for key in ("hook_point", "output_hook_point"):
            if key in entry and entry[key] != getattr(sae.cfg, key):
                raise PipelineInputError(
                    f"{directory / SUITE_INDEX}: {sae_id} lists {key} {entry[key]!r}, but {folder} holds "
                    f"{getattr(sae.cfg, key)!r}"
                )
        saes[sae_id] = sae
    return saes
