"""The one way rpfs starts a Python process of its own (the mount and instant daemons, the store's reader
processes, the freeze watchdog, the systemd timer's service): `python -I -m MODULE`, run from "/".

rpfs runs as root, often from a folder another user may write (a shared folder, /tmp). `python -m` puts the
working directory first on sys.path, so a module planted there would run as root in the child, in a mount
daemon before it reads the master key. -I (isolated mode) leaves out the working directory, the PYTHON*
variables and the user's site folder; the venv's site-packages (and rpfs's editable install, a .pth there)
stay. cwd="/" leaves nothing of the caller's folder to the child: every path handed to it must be absolute
(the RPFS_* folders of the environment are made so here).
"""
from __future__ import annotations

import os
import subprocess
import sys

PATH_VARIABLES = ("RPFS_RUN_DIR", "RPFS_CONFIG", "RPFS_CACHE", "RPFS_KEY_FILE", "RPFS_STORE")


def python_command(module: str, *args: str) -> list[str]:
    """The command line that runs `module` in this Python, isolated from the folder and the environment."""
    return [sys.executable, "-I", "-m", module, *args]


def start_python(module: str, args: list[str], **popen_args) -> subprocess.Popen:
    """Start `module` (with args, absolute paths only) as a child process run from "/"."""
    env = dict(os.environ)
    for name in PATH_VARIABLES:
        if env.get(name):
            env[name] = os.path.abspath(env[name])   # the same folder for the child as for us
    return subprocess.Popen(python_command(module, *args), cwd="/", env=env, **popen_args)
