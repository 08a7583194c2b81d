"""Metrics: exact metrics against a prior's true distribution (exact.py, with the nearest-template classifier of
classify.py) and FID (fid.py). Below the runner: they read samples and priors, never runs."""
