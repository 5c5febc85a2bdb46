"""Policies drive backups from above: schedules, retention, which VMs are protected, and `rpfs run`."""
