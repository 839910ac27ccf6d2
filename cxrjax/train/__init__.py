"""Training: train states, optimizers, pure jitted steps and the shared loop."""
