"""Merging experts into one model."""
