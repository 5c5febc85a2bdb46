"""Keeping a store healthy and accounted: prune, gc, compact, verify, usage, and the job record."""
