"""Data: tokenizers, conversation templates, per-sample features, image preprocessing, LLaVA JSON sources,
and the grain pipeline. Import the submodules directly (e.g. `meteor_jax.data.features`); this package
imports nothing itself, so loading one part never pulls in the others (or PIL, grain, the GGUF reader)."""
