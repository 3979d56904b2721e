"""Reproducible benchmarks against named anchors. Run them all with ``python -m bench``."""
