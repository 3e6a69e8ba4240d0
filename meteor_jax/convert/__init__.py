"""Weights as data: key tables plus small per-key transforms, in both directions, streamed."""
