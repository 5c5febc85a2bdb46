"""Backup: quiesce and snapshot the disks, read them as blocks, and commit a recovery point."""
