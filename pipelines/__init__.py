"""The parts that know diffusers and transformers: model configs and loading, data, losses, sampling."""
