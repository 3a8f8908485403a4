"""elmforest: language models as forests of independently trained expert LMs."""

__version__ = "0.1.0"
