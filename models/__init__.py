"""Flax Llama models and their weight loading."""
