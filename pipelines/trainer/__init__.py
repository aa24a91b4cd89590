"""The one training loop and what it owns: accelerator setup, stop, checkpoints, resumable data order, progress."""
