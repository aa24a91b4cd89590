"""Evaluation: DreamBench metrics (CLIP-I, CLIP-T, DINO) as pure functions on embeddings (issue #4)."""
