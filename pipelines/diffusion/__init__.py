"""The diffusers side: SD loading, DreamBooth data and loss, sampling, export for other tools, DreamBench."""
