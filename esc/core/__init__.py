"""Neutral types every layer may use (errors the user can fix)."""
