"""Layer 3: preprocessed activations — exact statistics, the shuffled .npy format and the stage that writes it."""
