"""Synthetic data: seeded scene corpora with exact captions."""
