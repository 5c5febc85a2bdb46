"""The few glibc calls Python has no binding for: how much memory a process keeps, when written data
starts for the disk, a filesystem's writes made durable at once, punching holes in a device, erasing a secret from the environment block, a rename
that never replaces, and no core dumps. The memory and writeback calls are hints: without glibc (another C library) they do nothing."""
from __future__ import annotations

import ctypes
import errno
import os
import resource

M_ARENA_MAX = -8                 # mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20    # glibc's largest on 64-bit: allocations up to it come from the heaps
KEPT_FREE_BYTES = 256 << 20      # freed heap memory a batch command keeps for reuse before giving it back
SYNC_FILE_RANGE_WRITE = 2        # start writeback of the range's dirty pages, do not wait

PR_SET_DUMPABLE = 4              # prctl option

try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _call(name: str, *args) -> None:
    function = getattr(_LIBC, name, None)
    if function is not None:
        function(*args)


def few_malloc_arenas() -> None:
    """glibc gives each worker thread a heap of its own, each keeping freed 1 MiB blocks for reuse, so a
    daemon's memory grew with its cache and then some (tools/load). Two heaps for all threads cost no
    measurable speed; mmapping every block instead (M_MMAP_THRESHOLD) cost a third of cold read speed."""
    _call("mallopt", M_ARENA_MAX, 2)


def reuse_freed_memory(allocations_up_to: int = MMAP_THRESHOLD_MAX, keep_free: int = KEPT_FREE_BYTES) -> None:
    """For a batch command that allocates and frees a block at a time (a backup, a full restore, a push):
    allocations up to allocations_up_to come from the heaps, which keep up to keep_free bytes freed for
    reuse, instead of being mmapped and unmapped or trimmed each time, which made every block's buffer
    fresh pages to fault in and zero: a 2 GiB backup took 224k page faults and 1-2 s of system time, 42-50k
    with this; decoding the bench image's 512 MiB of blobs 0.83 s of CPU, 0.25 s (docs/dev/benchmarks.md).
    Never for a daemon: it keeps what it freed."""
    _call("mallopt", M_MMAP_THRESHOLD, allocations_up_to)
    _call("mallopt", M_TRIM_THRESHOLD, keep_free)


def give_back_freed_memory() -> None:
    """Hand memory glibc keeps after frees (evicted blocks) back to the system: malloc_trim."""
    _call("malloc_trim", 0)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE): on a block device the kernel does it only where the device both frees the
    range and guarantees it reads back as zeros (BLKDEV_ZERO_NOFALLBACK); else it raises (EOPNOTSUPP)."""
    if _LIBC is None:
        raise OSError(errno.ENOSYS, "no fallocate without glibc")
    if _LIBC.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_int64(offset),
                       ctypes.c_int64(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range's dirty pages now (sync_file_range), so that a long write streams to the disk
    instead of piling up dirty pages for one long fsync at its end."""
    _call("sync_file_range", fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)


def sync_filesystem(fd: int) -> None:
    """Make every write to the filesystem holding fd durable (syncfs): one call where an fsync per file of a
    large tree would cost a disk flush each. Without glibc, sync() (every filesystem)."""
    if _LIBC is None:
        os.sync()
    elif _LIBC.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def erase_environment_value(name: str) -> None:
    """Overwrite the value of environment variable `name` with zeros where the C library keeps it, before
    it is unset. For a variable the process was started with, that is the block on the initial stack that
    the kernel shows in /proc/PID/environ: unsetenv (os.environ.pop) only unlinks it and leaves it readable
    there for as long as the process lives. Python's own copy (os.environ) is not reached."""
    if _LIBC is None:
        return
    getenv, strlen = _LIBC.getenv, _LIBC.strlen
    getenv.restype, getenv.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    strlen.restype, strlen.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    address = getenv(os.fsencode(name))
    if address:
        ctypes.memset(address, 0, strlen(address))


def no_core_dumps() -> None:
    """For a process that holds (or is about to hold) a master key or a passphrase: a crash (a SIGBUS on a
    damaged LMDB page, a bug in a C library) must not write its memory anywhere. Not dumpable: the kernel
    dumps nothing (with the default fs.suid_dumpable=0), not even to a core_pattern helper, which
    RLIMIT_CORE does not bind; and no process of the same user may ptrace it or read /proc/PID/mem. The soft
    RLIMIT_CORE of 0 covers fs.suid_dumpable=2: no core file, and systemd-coredump or apport, told the
    limit, keep nothing. The hard limit stays: children (pre/post scripts) inherit the soft 0 but may raise
    it; an exec makes them dumpable again."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    if _LIBC is not None and _LIBC.prctl(PR_SET_DUMPABLE, *(ctypes.c_ulong(0),) * 4) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_DUMPABLE): {os.strerror(code)}")


PR_SET_PDEATHSIG = 1             # prctl option


def die_with_parent(parent_pid: int) -> None:
    """In a child between fork and exec (a preexec_fn): the kernel sends it SIGKILL when the thread that
    started it dies, kill -9 of its parent included, so a server it execs never outlives rpfs. The signal
    setting survives exec (of a binary that is not setuid). A parent already gone is caught by getppid."""
    if _LIBC is None or _LIBC.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(9), *(ctypes.c_ulong(0),) * 3) != 0:
        os._exit(127)
    if os.getppid() != parent_pid:
        os._exit(127)


RENAME_NOREPLACE = 1             # renameat2 flag: fail with EEXIST rather than replace


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Rename an entry to a place that must be empty (renameat2 RENAME_NOREPLACE): never over something.
    Where the call or the flag is missing (another C library, a filesystem without it): a check, then a
    rename (the caller holds the only lock that writes there)."""
    function = getattr(_LIBC, "renameat2", None)
    if function is not None:
        if function(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))
    if os.path.lexists(f"/proc/self/fd/{dst_dir_fd}/{dst}"):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
