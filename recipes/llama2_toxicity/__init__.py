"""LLaMA-2-7B toxicity recipe (paper §4.3): see recipe.py."""
