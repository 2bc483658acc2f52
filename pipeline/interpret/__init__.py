"""Layer 6: meanings — the Claude batch client and prompts, the offline explainers, the sentence embedder (judge),
the meanings format.
"""
