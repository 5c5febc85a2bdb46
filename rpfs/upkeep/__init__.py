"""Keeping a store healthy and accounted: gc, compact, verify, usage, and the job record."""
