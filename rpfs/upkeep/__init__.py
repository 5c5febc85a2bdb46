"""Keeping a store healthy and accounted: check, gc, compact, verify, usage, and the job record."""
