"""dreamlora's Gradio app (train, sample, evaluate, compare) is issue #6 and not built yet.

This file exists so the project layout is the final one; it refuses to pretend.
"""

import sys

if __name__ == "__main__":
    sys.exit("dreamlora app: not built yet (issue #6). Use the Python API in the README meanwhile.")
