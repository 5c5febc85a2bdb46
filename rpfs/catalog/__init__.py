"""Files inside the disks: their catalog, find/ls/diff, and restoring them."""
