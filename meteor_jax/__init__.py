"""meteor-jax: LLaVA-Meteor (Flash Global Fusion + Visual-Native Selection) in JAX/Flax NNX."""

__version__ = "0.1.0"
