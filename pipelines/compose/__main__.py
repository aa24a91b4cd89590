"""`python -m pipelines.compose` (and `accelerate launch -m pipelines.compose`)."""

import os
import sys

from pipelines.compose.cli import cli

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
