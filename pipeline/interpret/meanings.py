"""The contract of `latent_index_meaning/`: what the interpretation stage writes and later stages read.

One JSON file per interpretation run, named after the run, holding
    {"sae_sha256": sha256 of the SAE's sae.safetensors, "explainer": "...", "latents": [
        {"latent": int, "meaning": str, "certainty": float in [0, 1], "score": float | null}, ...]}
sorted by score (the detection score, highest first) so people can read it top-down. Readers pick the files whose
sae_sha256 matches the SAE they hold; the newest file wins per latent.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_meanings(directory: str | Path, digest: str) -> dict[int, dict]:
    """{latent: {"meaning", "certainty", "score", "explainer", "file"}} for the SAE whose
    sae.safetensors has this sha256 ({} when there are none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    found: dict[int, dict] = {}
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a half-written or foreign file is not a meaning file
        if not isinstance(doc, dict) or doc.get("sae_sha256") != digest:
            continue
        for entry in doc.get("latents", []):
            found[int(entry["latent"])] = {**entry, "explainer": doc.get("explainer"), "file": path.name}
    return found
