"""`python -m dreamlora.tiny OUT_DIR`: a tiny Stable Diffusion 1.x pipeline, built offline and seeded.

The code is in `pipelines.diffusion.tiny_model` (it knows diffusers); this module keeps the command's name.
"""

from pipelines.diffusion.tiny_model import PRESETS, SD_SCHEDULE, build_pipeline, main, write

__all__ = ["PRESETS", "SD_SCHEDULE", "build_pipeline", "main", "write"]

if __name__ == "__main__":
    main()
