"""Layer 5: every latent's top-activating sentences — where they come from, how they are collected, the tables'
format.
"""
