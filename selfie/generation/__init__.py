"""Sampling responses from the policy: selfie's seeded sampler (static or continuous batches) and the vLLM backend."""
