"""Flax NNX modules of LLaVA-Meteor. Model code imports no data or training code."""
