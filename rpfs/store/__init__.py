"""The store: LMDB environment and catalog, the framing of stored blocks, recovery points, and leases."""
