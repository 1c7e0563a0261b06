"""Analyses on result rows: helpers shared by the notebooks (:mod:`esc.analysis.rows`), the
per-layer sensitivity script (``python -m esc.analysis.sensitivity``) and the link between ESC's
fitness and the test metric (``python -m esc.analysis.fitness_link``)."""
