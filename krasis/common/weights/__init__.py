"""Checkpoint loading: safetensors streaming and strict checks."""
