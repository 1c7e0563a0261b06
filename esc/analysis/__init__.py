"""Analyses on result rows: helpers shared by the notebooks (:mod:`esc.analysis.rows`) and the
per-layer sensitivity script (``python -m esc.analysis.sensitivity``)."""
