"""`python -m pipelines.compose`: LoRAHub-style learned composition of trained adapters (see `cli`)."""
