"""The parts that know the model libraries: `diffusion` (diffusers), `text` (transformers) and `trainer` (the one
training loop, on accelerate), under the thin commands `python -m pipelines.sample | dreambench | text_sweep | demo`.
"""
