"""Sentence splitting with NLTK's Punkt, never downloading anything.

- If NLTK's pretrained English Punkt data (`punkt_tab`) is installed, it is used.
- Otherwise Punkt parameters are trained unsupervised on the corpus itself (its first
  `train_chars` characters), plus a short seed list of common English abbreviations that a
  small corpus may not show often enough to learn (Dr., Mr., U.S., ...). The parameters are
  cached as JSON (no pickle) beside the dataset, and recorded in its manifest.

Documents are split at newlines first (headings and list items end without a period), then
each line with Punkt. Spans are character offsets into the document, stripped of whitespace.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTrainer

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import write_json_atomic

# Lower-case, without the final period, as Punkt stores them.
SEED_ABBREVIATIONS = (
    "dr",
    "mr",
    "mrs",
    "ms",
    "prof",
    "st",
    "jr",
    "sr",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "cf",
    "al",
    "approx",
    "inc",
    "ltd",
    "co",
    "corp",
    "no",
    "vol",
    "fig",
    "gen",
    "col",
    "lt",
    "sgt",
    "capt",
    "rev",
    "u.s",
    "u.k",
    "u.n",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "mt",
    "ft",
    "est",
    "dept",
    "univ",
)
_LINE = re.compile(r"[^\n]+")


class SentenceSplitter:
    def __init__(self, tokenizer: PunktSentenceTokenizer, kind: str, info: dict):
        self.tokenizer = tokenizer
        self.kind = kind
        self.info = info

    def describe(self) -> dict:
        return {"splitter": "nltk-punkt", "kind": self.kind, **self.info}

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Non-empty sentence spans (start, end) into `text`, in order, stripped of whitespace."""
        out = []
        for line in _LINE.finditer(text):
            base = line.start()
            for s, e in self.tokenizer.span_tokenize(line.group()):
                piece = text[base + s : base + e]
                lead = len(piece) - len(piece.lstrip())
                trail = len(piece) - len(piece.rstrip())
                if lead + trail < len(piece):
                    out.append((base + s + lead, base + e - trail))
        return out

    @staticmethod
    def pretrained_english() -> "SentenceSplitter | None":
        try:
            # nltk < 3.9 has no PunktTokenizer: the import is the version check
            from nltk.tokenize.punkt import PunktTokenizer

            tok = PunktTokenizer("english")
        except (LookupError, ImportError, OSError):
            return None
        return SentenceSplitter(tok, "pretrained-english", {"data": "nltk punkt_tab/english"})

    @staticmethod
    def train(texts: Iterable[str], train_chars: int) -> "SentenceSplitter":
        trainer = PunktTrainer()
        trainer.INCLUDE_ALL_COLLOCS = True
        used, chunk, chunk_chars = 0, [], 0
        for t in texts:
            chunk.append(t)
            used += len(t)
            chunk_chars += len(t)
            if chunk_chars > 1_000_000:  # train in ~1M-char pieces: bounded memory
                trainer.train("\n\n".join(chunk), finalize=False)
                chunk, chunk_chars = [], 0
            if used >= train_chars:
                break
        if chunk:
            trainer.train("\n\n".join(chunk), finalize=False)
        if used == 0:
            raise PipelineInputError("cannot train the Punkt splitter: the source has no text")
        trainer.finalize_training()
        params = trainer.get_params()
        params.abbrev_types.update(SEED_ABBREVIATIONS)
        return SentenceSplitter(
            PunktSentenceTokenizer(params),
            "trained-on-corpus",
            {
                "train_chars": used,
                "seed_abbreviations": list(SEED_ABBREVIATIONS),
                "n_abbreviations": len(params.abbrev_types),
                "n_collocations": len(params.collocations),
                "n_sentence_starters": len(params.sent_starters),
            },
        )

    def save(self, path: Path) -> None:

        p = self.tokenizer._params
        write_json_atomic(
            path,
            {
                "kind": self.kind,
                "info": self.info,
                "abbrev_types": sorted(p.abbrev_types),
                "collocations": sorted(map(list, p.collocations)),
                "sent_starters": sorted(p.sent_starters),
                "ortho_context": dict(sorted(p.ortho_context.items())),
            },
        )

    @staticmethod
    def load(path: Path) -> "SentenceSplitter":
        try:
            d = json.loads(Path(path).read_text())
            p = PunktParameters()
            p.abbrev_types = set(d["abbrev_types"])
            p.collocations = {tuple(c) for c in d["collocations"]}
            p.sent_starters = set(d["sent_starters"])
            for word, flags in d["ortho_context"].items():
                p.ortho_context[word] = int(flags)
            return SentenceSplitter(PunktSentenceTokenizer(p), d["kind"], d["info"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PipelineInputError(f"{path}: not a Punkt parameter file ({e}); delete it to retrain") from None
