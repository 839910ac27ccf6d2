"""Metrics: classification, generative and clustering metrics, and metric writers."""
