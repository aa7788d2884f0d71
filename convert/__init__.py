"""Hugging Face <-> iada-jax conversion: one mapping table, both directions."""
