"""Evaluation: generation over benchmark records and their scorers."""
