"""`python -m pipelines.text_sweep`: the text-classifier learning-rate sweep.

The code is in `pipelines.text.sweep`; this module keeps the command's name."""

from pipelines.text.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
