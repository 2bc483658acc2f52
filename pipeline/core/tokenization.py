"""What an SAE must be fed: how a sentence becomes the token sequence whose activations it saw.

Set by the capture (BOS, truncation) and preprocessing (excluded sink positions), carried in their
manifests into the SAE's cfg.json, and read from there by every later stage (top sentences, the
spliced evaluation, steering, exports), so none of them re-asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

DEFAULT_MAX_TOKENS = 192


@dataclass(frozen=True)
class Tokenization:
    add_bos: bool = False
    """The capture prepended BOS; its position was never stored (so never seen by the SAE)."""
    max_tokens: int = DEFAULT_MAX_TOKENS
    """Text tokens kept per sentence (longer ones truncated); BOS comes on top."""
    exclude_first_positions: int = 0
    """Text positions (after BOS) left out of training: the attention sink of BOS-less sentences."""
    sink_norm: float = 0.0
    """Tokens whose activation norm at the hook point exceeds this were left out of training wherever they
    stand: massive activations (attention sinks past the first position, e.g. the second piece of a split
    first word), 60-90x the median norm. Later stages leave them untouched. 0: none."""

    @property
    def sequence_tokens(self) -> int:
        """Tokens per sequence at most, BOS included."""
        return self.max_tokens + int(self.add_bos)

    @property
    def skip_first_positions(self) -> int:
        """Sequence positions the SAE never saw: BOS, then the excluded text positions."""
        return int(self.add_bos) + self.exclude_first_positions

    def encode(self, tokenizer, texts: Iterable[str]) -> list[list[int]]:
        """Sentences -> the token sequences the capture made of them (BOS, truncation)."""
        return [t[: self.sequence_tokens] for t in tokenizer.encode_batch(list(texts), bos=self.add_bos)]
