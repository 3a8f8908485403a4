"""Forests of expert LMs: manifest, branching, training, ensembling."""
