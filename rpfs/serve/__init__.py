"""Serving recovery points: the image read path, the FUSE trees, and the daemons that mount them."""
