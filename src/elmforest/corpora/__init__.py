"""Corpora elmforest can build offline, from package registries alone.

Building a corpus (downloading packages, unpacking, parsing, cleaning) is not what the toolkit is
about, so it lives here rather than in :mod:`elmforest.data`, which only reads, splits, tokenizes
and shards whatever corpus it is given. Today this is the demo corpus
(:mod:`elmforest.corpora.demo`, with its evaluation-only domains in
:mod:`elmforest.corpora.demo_ood`); a multilingual corpus is to join it.
"""
