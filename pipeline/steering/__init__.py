"""Layer 7: steering — the SAE spliced into the model, sessions, steering vectors, output scores, the judge, the
evaluation and its results.
"""
