"""The diffusers side: SD loading, the tiny model, DreamBooth data and loss, class images, sampling, export for
other tools, DreamBench."""
