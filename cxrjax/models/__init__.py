"""Models: flax.linen modules only; they never import data or training code."""
