"""cxrjax: chest X-ray classification and anomaly detection with generative augmentation, in JAX."""

__version__ = "0.1.0"
