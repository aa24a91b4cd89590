"""The app's back-end: what app.py's pages call (training jobs, sampling, scoring, served files, settings)."""
