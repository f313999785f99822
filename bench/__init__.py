"""Strata's benchmark suite: ``make bench`` (``python -m bench``)."""
