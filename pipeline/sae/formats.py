"""Other tools' SAE folders, read and written in one place: SAELens (6.x) and EleutherAI sparsify, and
`load_sae`, which reads any of them or ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from llama_3.errors import PipelineInputError
from llama_3.hooks import HookPoint
from pipeline.core.manifest import sha256_file
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


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> TopKSae:
    """The SAE in `directory`, whichever layout it has (ours, SAELens', sparsify's), with `sae.sha256` (its
    weights file's, computed here once) and `sae.directory` set."""
    sae = _read_sae(Path(directory), device)
    sae.directory = Path(directory)
    sae.sha256 = sae_sha256(directory)
    return sae


def _read_sae(directory: Path, device: str | torch.device) -> TopKSae:
    try:
        raw = json.loads((directory / SAE_CONFIG).read_text())
        if isinstance(raw, dict) and "d_sae" in raw and (directory / SAELENS_WEIGHTS).is_file():
            return load_saelens(directory, raw, device)
        if isinstance(raw, dict) and "d_in" in raw and "d_model" not in raw:
            return load_sparsify(directory, raw, device)
        cfg = SaeConfig(**raw)
    except FileNotFoundError:
        if (directory / SAE_SUBDIR / SAE_CONFIG).is_file():  # the training run's folder: the SAE is inside it
            raise PipelineInputError(
                f"{directory}: a training run folder, not an SAE; the SAE is {directory / SAE_SUBDIR}"
            ) from None
        raise PipelineInputError(f"{directory / SAE_CONFIG}: file not found (not an SAE folder?)") from None
    except (TypeError, json.JSONDecodeError) as e:
        raise PipelineInputError(f"{directory / SAE_CONFIG}: not an SAE config ({e})") from None
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


def load_saelens(directory: Path, raw: dict, device: str | torch.device = "cpu") -> TopKSae:
    """(From load, with `raw` its parsed cfg.json.) A TopK, JumpReLU or standard (ReLU) SAE in SAELens'
    layout (SAE.save_model: cfg.json with
    `metadata`, sae_weights.safetensors with W_enc [d, L], b_enc, W_dec [L, d], b_dec, JumpReLU's
    threshold [L]), for inference: the same forward on raw activations. Gemma Scope and Llama Scope SAEs
    arrive this way: SAE.from_pretrained(release, id) converts them (and folds Llama Scope's input
    norm), save_model writes this layout. What it must be fed comes from the metadata: hook_name
    (blocks.L.hook_resid_pre / _mid / _post), prepend_bos, context_size, seqpos_slice [start, None]."""
    where = directory / SAE_CONFIG
    meta = raw.get("metadata") or raw  # SAELens < 6 kept these keys at the top level
    arch = raw.get("architecture") or ("topk" if raw.get("activation_fn") == "topk" else "standard")
    if arch not in ("topk", "jumprelu", "standard"):
        raise PipelineInputError(f"{where}: a SAELens {arch!r} SAE; only topk, jumprelu and standard SAEs import")
    if raw.get("activation_fn", "relu") not in ("relu", "topk"):
        raise PipelineInputError(f"{where}: activation_fn {raw.get('activation_fn')!r}; only relu (or topk) imports")
    if raw.get("normalize_activations", "none") != "none" or raw.get("reshape_activations", "none") != "none":
        raise PipelineInputError(
            f"{where}: normalize_activations {raw.get('normalize_activations')!r} / reshape_activations "
            f"{raw.get('reshape_activations')!r}; only SAEs on raw activations import"
        )
    hook = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)", str(meta.get("hook_name")))
    if hook is None:
        raise PipelineInputError(f"{where}: hook_name {meta.get('hook_name')!r} is not a residual-stream hook")
    add_bos = bool(meta.get("prepend_bos", True))
    start = (meta.get("seqpos_slice") or [None])[0] or 0
    context = meta.get("context_size")
    cfg = SaeConfig(
        d_model=int(raw["d_in"]),
        n_latents=int(raw["d_sae"]),
        k=int(raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k", 0)) if arch == "topk" else 0,
        activation="topk" if arch == "topk" else "jumprelu",  # standard: ReLU = JumpReLU at threshold 0
        normalize="none",
        hook_point=f"{hook[2]}.{hook[1]}",
        model={"d_model": int(raw["d_in"]), "source": "saelens", "name": meta.get("model_name")},
        add_bos=add_bos,
        exclude_first_positions=max(0, int(start) - int(add_bos)),
        max_tokens=int(context) - int(add_bos) if context else DEFAULT_MAX_TOKENS,
    )
    path = directory / SAELENS_WEIGHTS
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch == "jumprelu" else ())
    w = read_weights(path, {k: k for k in names}, "SAELens'")
    w_enc, b_enc, w_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    if raw.get("rescale_acts_by_decoder_norm") and not torch.allclose(w_dec.norm(dim=1), torch.ones(1), atol=1e-4):
        raise PipelineInputError(f"{where}: rescale_acts_by_decoder_norm with non-unit decoder rows does not import")
    if not raw.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
    weights = {"W_enc": w_enc.t(), "b_enc": b_enc, "W_dec": w_dec, "b_pre": b_dec}
    if cfg.activation == "jumprelu":
        weights["threshold"] = w["threshold"] if arch == "jumprelu" else torch.zeros(cfg.n_latents)
    return TopKSae.from_weights(cfg, weights, path, device)


def export_scale(sae: TopKSae, tool: str) -> float:
    """The input scale s an export folds into the weights (1 without normalisation); the other tools have
    no per-token standardisation, so such an SAE is refused."""
    if sae.cfg.normalize == "token":
        raise PipelineInputError(f"{tool} has no per-token standardisation; export needs normalize=dataset or none")
    return sae.cfg.input_scale if sae.cfg.normalize == "dataset" else 1.0


def export_saelens(sae: TopKSae, directory: str | Path, unit_decoder: bool = False) -> None:
    """SAELens 6.x's layout (SAE.load_from_disk): W_enc [d, L], W_dec [L, d], b_enc, b_dec; a TopK SAE
    (a JumpReLU one with its threshold).

    SAELens' encoder has no separate b_pre: its b_dec is subtracted from the input, as ours is. The
    input scale s is folded so the exported SAE works on raw activations: by default into the decoder
    (rows of norm 1/s, our latent values exactly); with unit_decoder into the biases instead (unit rows,
    latents ours / s, `rescale_acts_by_decoder_norm: true`: what sae-dashboard's W_dec-norm folding
    accepts). The metadata carries what the SAE must be fed: the TransformerLens hook of its hook kind,
    context_size and prepend_bos of the capture, and `seqpos_slice` [first trained position, None]
    (BOS and the excluded sink positions left out, as our splice leaves them).
    """
    s = export_scale(sae, "SAELens")
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
    hook = HookPoint.parse(sae.cfg.hook_point, flag=f"SAE hook point {sae.cfg.hook_point!r}")
    if hook.kind not in TRANSFORMERLENS_HOOKS:
        raise PipelineInputError(
            f"SAE at {hook}: TransformerLens has no hook for the RMSNorm output after its weight "
            "(ln*.hook_normalized comes before it); SAELens export needs a resid_pre / resid_mid / resid_post SAE"
        )
    tokenization = sae.cfg.tokenization
    model = dict(sae.cfg.model or {})
    cfg = {
        "architecture": sae.cfg.activation,
        "d_in": sae.cfg.d_model,
        "d_sae": sae.cfg.n_latents,
        **({"k": sae.cfg.k} if sae.cfg.activation == "topk" else {}),
        "rescale_acts_by_decoder_norm": unit_decoder,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained here, not by SAELens
            "hook_name": f"blocks.{hook.layer}.{TRANSFORMERLENS_HOOKS[hook.kind]}",
            # a name, not a local path; the full identity (hashes of config and tokenizer) beside it
            "model_name": Path(model["path"]).stem if model.get("path") else None,
            "model_identity": model,
            "context_size": tokenization.sequence_tokens,
            "prepend_bos": tokenization.add_bos,
            "seqpos_slice": [tokenization.skip_first_positions, None],
            "exported_by": "llama-sae sae.py",
        },
    }
    write_sae_folder(directory, SAELENS_WEIGHTS, tensors, cfg)


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


TRANSFORMERLENS_HOOKS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post"}
"""Our hook kinds -> TransformerLens' hook in blocks.<layer> (the value at each is the same tensor)."""


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
