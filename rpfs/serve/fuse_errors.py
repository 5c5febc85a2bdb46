"""The boundary of every pyfuse3 handler: only FUSEError may leave one (anything else ends the mount).

A domain error (a corrupt or missing block, above all) and any bug are logged and answered EIO, so a
reader gets an error for that range, never wrong data and never a dead mount.
"""
from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

from rpfs.errors import RpfsError

log = logging.getLogger("rpfs.mount")


def fuse_errors(handler):
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except RpfsError as e:
            log.error("%s: %s", handler.__name__, e.message)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper
