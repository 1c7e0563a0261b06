"""Errors that name a problem the user can fix; the command line prints their message alone.

Every layer raises a subclass of :class:`UserError` for bad input (a config value, a missing or
damaged file, NaN in data or weights), with one sentence that names the problem and the fix.
``python -m esc.run`` prints that sentence and exits with status 2, without a traceback; any
other exception is a defect and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the problem and how to fix it."""
