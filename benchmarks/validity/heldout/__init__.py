"""Families held out by source: written before the rule work, run once at the end."""
