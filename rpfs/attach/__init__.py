"""Attach: mount the filesystems inside disk images read-only, one image or a whole VM."""
