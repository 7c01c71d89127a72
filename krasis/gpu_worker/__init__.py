"""GPU prefill worker (planned: issues 4 and 5)."""
