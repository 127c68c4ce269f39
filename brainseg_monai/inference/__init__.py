"""Inference: batched test-time augmentation, post-processing, writers in the source geometry, the batch job."""
