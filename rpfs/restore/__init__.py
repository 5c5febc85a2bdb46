"""Bringing disks back: full restore to a file or device, and instant restore through a writable image."""
