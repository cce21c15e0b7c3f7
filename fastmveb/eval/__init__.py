"""Evaluation: kNN, linear probe (offline and online)."""
