"""The NBD client and NbdDiskSource against qemu's own servers (qemu-storage-daemon, qemu-nbd), and a
fake server that answers wrongly: a read gives the right bytes or one error line, never wrong bytes."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rpfs.backup.nbd_source import NbdDiskSource
from rpfs.backup.source import BufferPool
from rpfs.errors import RpfsError
from rpfs.store.blob import BlockCodec
from rpfs.store.recovery_point import HOLE
from rpfs.vm import nbd
from rpfs.vm.image_export import exported
from rpfs.vm.nbd import NbdConnection

MiB = 1 << 20


@pytest.fixture(autouse=True)
def short_run_dir(monkeypatch):
    """A unix socket path holds at most 107 bytes: tmp_path is too deep for one."""
    folder = tempfile.mkdtemp(prefix="rpfs-nbd-")
    monkeypatch.setenv("RPFS_RUN_DIR", folder)
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def qemu(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


def read_all(source: NbdDiskSource, block_size: int, workers: int = 3) -> bytes:
    """As the backup pipeline reads: read_block of every block on worker threads."""
    buffers, codec = BufferPool(block_size), BlockCodec("blake3")
    out = bytearray(source.size)

    def one(index: int) -> None:
        digest, data = source.read_block(index, block_size, buffers, codec)
        if digest == HOLE:
            assert data is None
            return
        assert digest == codec.block_id(data)
        out[index * block_size:index * block_size + len(data)] = data
        buffers.give(data)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(source.block_count(block_size))))
    return bytes(out)


def test_qcow2_with_backing_file_reads_as_qemu_img_convert(tmp_path):
    base, top, raw = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "top.raw"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), "9M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 5M 700k", str(base))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "9M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 1536k", "-c", "write -z 5M 64k",
         "-c", "write -P 0x44 8704k 3k", str(top))
    qemu("qemu-img", "convert", "-O", "raw", str(top), str(raw))
    with exported({"vda": (top, "qcow2")}) as (socket_path, exports):
        assert exports == {"vda": "vda"}
        source = NbdDiskSource.open("vda", socket_path, exports["vda"], shown_as=f"{top}")
        try:
            assert source.size == 9 * MiB and source.path == str(top)
            assert read_all(source, MiB) == raw.read_bytes()
            assert read_all(source, 64 << 10) == raw.read_bytes()   # several threads, each its connection
            assert len(source._connections) > 2
        finally:
            source.close()
        assert source._connections == []


def test_holes_are_not_read(tmp_path):
    image = tmp_path / "sparse.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB + 100 * 1024)   # the last block is short, and a hole
        f.seek(10 * MiB + 4096)
        f.write(b"x" * 4096)
    with exported({"vdb": (image, "raw")}) as (socket_path, exports):
        source = NbdDiskSource.open("vdb", socket_path, exports["vdb"], shown_as=str(image))
        try:
            data = read_all(source, MiB)
            assert data == image.read_bytes()
            assert source.bytes_read == MiB   # the one block with data; 64 holes read nothing
        finally:
            source.close()


def test_dirty_bitmap_marks_exactly_the_written_blocks(tmp_path):
    image = tmp_path / "x.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 8M", str(image))   # before the bitmap: not dirty
    qemu("qemu-img", "bitmap", "--add", "--enable", str(image), "b0")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(image))
    context = "qemu:dirty-bitmap:b0"
    with exported({"vda": (image, "qcow2")}, bitmaps={"vda": "b0"}) as (socket_path, exports):
        source = NbdDiskSource.open("vda", socket_path, exports["vda"], "x.qcow2",
                                    contexts=("base:allocation", context))
        try:
            unchanged = source.dirty_blocks(context, 64 << 10)
            assert len(unchanged) == 128
            assert [i for i, same in enumerate(unchanged) if not same] == [16]   # 1M / 64k
            unchanged = source.dirty_blocks(context, MiB)
            assert list(unchanged) == [1, 0, 1, 1, 1, 1, 1, 1]
            with pytest.raises(RpfsError, match="was not negotiated"):
                source.dirty_blocks("qemu:dirty-bitmap:other", MiB)
        finally:
            source.close()
        with pytest.raises(RpfsError, match="no meta context 'qemu:dirty-bitmap:nope'") as e:
            NbdDiskSource.open("vda", socket_path, "vda", "x", contexts=("qemu:dirty-bitmap:nope",))
        assert "\n" not in str(e.value)


def test_qemu_nbd_serves_the_same_bytes(tmp_path):
    """The client against the other qemu server too (libvirt's backup export is qemu's NBD server)."""
    image, sock = tmp_path / "y.qcow2", Path(os.environ["RPFS_RUN_DIR"]) / "y.sock"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 1M", str(image))
    server = subprocess.Popen(["qemu-nbd", "-r", "-e", "8", "-f", "qcow2", "-x", "disk", "-k", str(sock), "-t",
                               str(image)])
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        source = NbdDiskSource.open("vda", sock, "disk", "y")
        try:
            assert read_all(source, MiB) == bytes(MiB) + b"\x77" * MiB + bytes(2 * MiB)
            assert source.bytes_read == MiB
        finally:
            source.close()
        with pytest.raises(RpfsError, match=r"^NBD export 'nosuch': refused \(unknown export\)"):
            NbdConnection.open(sock, "nosuch")
    finally:
        server.kill()
        server.wait()


def test_bad_images_are_one_line(tmp_path):
    with pytest.raises(RpfsError, match="does not exist"):
        with exported({"vda": (tmp_path / "none.qcow2", "qcow2")}):
            pass
    with pytest.raises(RpfsError, match="only raw and qcow2"):
        with exported({"vda": (tmp_path / "none.vmdk", "vmdk")}):
            pass
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"not a qcow2")
    with pytest.raises(RpfsError, match=f"^disk vda: cannot export {raw}: Image is not in qcow2 format") as e:
        with exported({"vda": (raw, "qcow2")}):
            pass
    assert "\n" not in str(e.value)
    image = tmp_path / "no-bitmap.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    with pytest.raises(RpfsError, match=f"^disk vdb: cannot export {image}: Bitmap 'b0' is not found"):
        with exported({"vda": (raw, "raw"), "vdb": (image, "qcow2")}, bitmaps={"vdb": "b0"}):
            pass
    assert os.listdir(Path(os.environ["RPFS_RUN_DIR"]) / "nbd") == []


def test_an_image_a_running_qemu_writes_is_refused(tmp_path):
    """qemu's image locks: a shut-off domain's export never reads an image a running qemu writes (torn)."""
    image, sock = tmp_path / "busy.qcow2", Path(os.environ["RPFS_RUN_DIR"]) / "busy.sock"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    writer = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-t", str(image)])
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        with pytest.raises(RpfsError, match=r'^disk vda: cannot export .*: Failed to get shared "write" lock'
                                            r" \(is a running qemu using it\?\)$"):
            with exported({"vda": (image, "qcow2")}):
                pass
    finally:
        writer.kill()
        writer.wait()


# -- a server that answers wrongly ---------------------------------------------------------------------

SIZE = 1 << 20


def fake_server(path: Path, answer) -> threading.Thread:
    """Listens at path; does the handshake for an export of SIZE bytes, then answer(conn, handle, offset,
    length) for the first request."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def recv(conn, n):
        data = b""
        while len(data) < n:
            part = conn.recv(n - len(data))
            if not part:
                raise EOFError
            data += part
        return data

    def serve():
        conn, _ = listener.accept()
        listener.close()
        with conn:
            try:
                conn.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
                recv(conn, 4)
                while True:
                    _magic, option, length = struct.unpack(">QII", recv(conn, 16))
                    recv(conn, length)
                    if option == nbd.OPT_GO:
                        info = struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, 1)
                        conn.sendall(struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, option, nbd.REP_INFO, len(info))
                                     + info)
                    conn.sendall(struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, option, nbd.REP_ACK, 0))
                    if option == nbd.OPT_GO:
                        break
                _magic, _flags, _type, handle, offset, length = struct.unpack(">IHHQQI", recv(conn, 28))
                answer(conn, handle, offset, length)
                conn.recv(1 << 16)   # until the client hangs up
            except (EOFError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def chunk(flags: int, kind: int, handle: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, kind, handle, len(payload)) + payload


def data_chunk(handle, offset, data, done=True):
    return chunk(1 if done else 0, nbd.CHUNK_OFFSET_DATA, handle, struct.pack(">Q", offset) + data)


ANSWERS = {
    "short": (lambda h, o, n: data_chunk(h, o, b"a" * (n - 1)), "answered short"),
    "twice": (lambda h, o, n: data_chunk(h, o, b"a" * n, done=False) + data_chunk(h, o, b"b" * n),
              "each byte exactly once"),
    "outside": (lambda h, o, n: data_chunk(h, o + 1, b"a" * n), "outside the range read"),
    "handle": (lambda h, o, n: data_chunk(h + 1, o, b"a" * n), "handle mismatch"),
    "magic": (lambda h, o, n: b"\0" * 20, "bad reply magic"),
    "hole": (lambda h, o, n: chunk(1, nbd.CHUNK_OFFSET_HOLE, h, struct.pack(">QI", o, n + 1)),
             "outside the range read"),
    "error too long": (lambda h, o, n: chunk(1, nbd.CHUNK_ERROR_BIT | 1, h, b"\0" * (1 << 20)), "malformed error chunk"),
    "error": (lambda h, o, n: chunk(1, nbd.CHUNK_ERROR_BIT | 1, h, struct.pack(">IH", 5, 9) + b"bad\nsect"
                                    + b"\x1b"), r"failed: Input/output error \(bad\\nsect\\x1b\)"),
    "simple error": (lambda h, o, n: struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 28, h), "No space left"),
    "hangs up": (lambda h, o, n: data_chunk(h, o, b"a" * n)[:100], "closed the connection"),
}


@pytest.mark.parametrize("case", sorted(ANSWERS))
def test_a_wrong_answer_is_one_error_line_never_wrong_bytes(tmp_path, case):
    make, expected = ANSWERS[case]
    path = Path(os.environ["RPFS_RUN_DIR"]) / "fake.sock"

    def answer(conn, h, o, n):
        conn.sendall(make(h, o, n))
        if case == "hangs up":
            conn.shutdown(socket.SHUT_WR)

    thread = fake_server(path, answer)
    connection = NbdConnection.open(path, "vda", timeout=10)
    buffer = bytearray(b"z" * 4096)
    try:
        with pytest.raises(RpfsError, match=expected) as e:
            connection.read_into(buffer, 4096)
        assert (connection._sock is None) != case.endswith("error")   # a peer that broke the protocol is dropped
    finally:
        connection.close()
        thread.join(10)
    assert str(e.value).startswith("NBD export 'vda': ") and "\n" not in str(e.value)


def test_a_huge_block_status_is_refused_before_it_is_read(tmp_path):
    path = Path(os.environ["RPFS_RUN_DIR"]) / "fake.sock"
    thread = fake_server(path, lambda conn, h, o, n: conn.sendall(
        struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, 1, nbd.CHUNK_BLOCK_STATUS, h, (1 << 32) - 4)))
    connection = NbdConnection.open(path, "vda", timeout=10)
    connection.contexts["base:allocation"] = 0   # as if negotiated: the fake server skips that
    connection._context_names[0] = "base:allocation"
    try:
        with pytest.raises(RpfsError, match="malformed block status chunk of 4294967292 bytes"):
            connection.block_status("base:allocation", 0, SIZE)
    finally:
        connection.close()
        thread.join(10)


# -- the server never outlives rpfs --------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from rpfs.vm.image_export import exported
with exported({"vda": (Path(sys.argv[1]), "raw")}) as (socket_path, exports):
    print(socket_path, flush=True)
    time.sleep(600)
"""


def servers_on(socket_path: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if socket_path.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_kill_9_of_the_holder_leaves_no_server(tmp_path):
    image = tmp_path / "d.raw"
    image.write_bytes(b"\1" * MiB)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(image)], stdout=subprocess.PIPE, text=True)
    try:
        socket_path = holder.stdout.readline().strip()
        assert socket_path and servers_on(socket_path)
        with NbdConnection.open(socket_path, "vda") as connection:
            assert connection.read(0, 16) == b"\1" * 16
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        for _ in range(500):
            if not servers_on(socket_path):
                break
            time.sleep(0.01)
        assert servers_on(socket_path) == []
        folder = Path(socket_path).parent
        assert folder.exists()                       # nobody was left to remove it...
        with exported({"vda": (image, "raw")}) as (again, _):
            assert not folder.exists()               # ...the next export does
            assert Path(again).exists()
        assert not Path(again).parent.exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
