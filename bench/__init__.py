"""The benchmark of a metacenter node: ``make bench`` (``python -m bench``).
See docs/performance.md."""
