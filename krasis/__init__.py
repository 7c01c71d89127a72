"""krasis: serve large Mixture-of-Experts models with GPU prefill and a CPU decode pool."""
