"""Tensor-parallel layers of the model zoo (linear, embedding, norm, rotary, attention)."""
