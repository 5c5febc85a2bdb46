"""One exception type for every user-facing failure: the CLI prints its message on one line, no traceback."""


class RpfsError(Exception):
    """A failure the user can act on: a bad argument, a missing store, a busy mountpoint."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class CorruptBlockError(RpfsError):
    """Stored data failed its check (a block its CRC or digest, a record its parse): a block's range reads
    as EIO, never as wrong data."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=3)
