"""Layer 8: what a person reads — the report page and the feature browser."""
