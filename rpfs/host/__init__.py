"""The host rpfs runs on: its system tools, its mount table, and which disks are busy."""
