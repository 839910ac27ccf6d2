"""Data: TFDS builders, sources, Grain transforms and pipelines."""
