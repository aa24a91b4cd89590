"""`python -m pipelines.sample`: sampling with one or more adapters.

The code is in `pipelines.diffusion.sample`; this module keeps the command's name."""

from pipelines.diffusion.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
