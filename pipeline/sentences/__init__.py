"""Layer 1: the sentence dataset — text sources, the sentence splitter, the parquet format and its builder."""
