"""One exception type for every user-facing failure: the CLI prints its message on one line, no traceback;
and the exit codes of `rpfs`, the one table of them."""

EXIT_OK = 0                 # done
EXIT_USER_ERROR = 1         # a failure the user can act on (RpfsError), or the system said no (OSError, LMDB)
EXIT_USAGE = 2              # a bad argument on the command line (argparse)
EXIT_CORRUPT = 3            # stored data failed its check (CorruptBlockError): the store or vault is damaged there
EXIT_PROBLEMS_FOUND = 4     # rpfs verify found damaged recovery points, or rpfs check problems it left unrepaired
EXIT_INTERRUPTED = 130      # Ctrl-C (SIGINT), as a shell reports a command it ended: 128 + 2
EXIT_CLOSED_PIPE = 141      # the reader of stdout went away (`rpfs list | head`), as a shell says SIGPIPE: 128 + 13


class RpfsError(Exception):
    """A failure the user can act on: a bad argument, a missing store, a busy mountpoint."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class CorruptBlockError(RpfsError):
    """Stored data failed its check (a block its CRC or digest, a record its parse): a block's range reads
    as EIO, never as wrong data."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=EXIT_CORRUPT)
