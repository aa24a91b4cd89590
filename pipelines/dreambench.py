"""`python -m pipelines.dreambench`: DreamBench generation.

The code is in `pipelines.diffusion.dreambench`; this module keeps the command's name."""

from pipelines.diffusion.dreambench import main

if __name__ == "__main__":
    raise SystemExit(main())
