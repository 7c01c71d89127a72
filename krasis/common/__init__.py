"""Shared by every process: config, models, layers, weights, tokenizer, sampling."""
