"""The vault: recovery points off the host, in an S3 bucket, read through the same image path as the store."""
