"""Uncompressed `.npz` files whose arrays are memory-mapped read-only (shared through the page cache).

`NpzWriter` writes a standard NumPy `.npz` (a ZIP of `.npy` members, stored, not compressed — `np.load`
reads it) with fixed timestamps and modes, so identical arrays give byte-identical files, and with every
member's data 64-byte aligned (a zipalign-style padding extra field). `map_npz` maps the whole file once
with `mmap` and returns each member as a read-only ndarray view into it: no copy, no per-process memory —
every process that maps the file shares its pages. Also reads `.npz` files written by `np.savez` (stored
members; their data is then not aligned, which numpy handles).

Members read sparsely at random (the UTF-8 bytes of the text column) can instead be returned as a
`FileBytes`: slices are `pread` from the page cache, so a process holds only what it asked for, not every
page it ever touched (a mapped page stays in the process' RSS once touched).
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

ALIGN = 64                      # member data (the .npy magic) starts at a multiple of this
_PAD_EXTRA_ID = 0xD935          # the extra-field id zipalign uses for padding
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")     # zipfile.structFileHeader (30 bytes)
_ZIP64_LOCAL_EXTRA = 20         # zipfile's zip64 extra in a local header (force_zip64=True)
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


class NpzWriter:
    """`with NpzWriter(path) as w: w.add("x", array); w.add_chunks("ids", np.int32, n, chunks)`.

    Written to `<path>.tmp-<pid>`, fsynced and renamed on a clean exit (readers see all or nothing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        if a.dtype.hasobject:
            raise TypeError(f"{name}: object arrays cannot be stored (no pickle)")
        self.add_chunks(name, a.dtype, a.shape, [a])

    def add_chunks(self, name: str, dtype, shape, chunks: Iterable[np.ndarray]) -> None:
        """A member of `shape` written from consecutive C-order `chunks` (never all in memory at once)."""
        dtype = np.dtype(dtype)
        header = _npy_header(dtype, shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        zi = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
        zi.compress_type = zipfile.ZIP_STORED
        zi.external_attr = 0o644 << 16
        zi.file_size = len(header) + nbytes
        fname = zi.filename.encode("utf-8")
        base = self.zf.start_dir + _LOCAL_HEADER.size + len(fname) + 4 + _ZIP64_LOCAL_EXTRA
        pad = (-base) % ALIGN
        zi.extra = struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"\0" * pad
        written = 0
        with self.zf.open(zi, mode="w", force_zip64=True) as f:
            f.write(header)
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                f.write(memoryview(c).cast("B"))
                written += c.nbytes
        if written != nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, shape {shape} needs {nbytes}")

    def close(self, commit: bool = True) -> None:
        self.zf.close()
        if not commit:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(commit=exc_type is None)


class FileBytes:
    """`nbytes` bytes of `path` from `offset` on, read on demand: `fb[a:b] -> bytes` (one `pread`).

    A stand-in for a 1-D uint8 member where slices are all that is used. Safe across fork/spawn: a new
    process opens its own descriptor (a pickled FileBytes carries the path, not the descriptor)."""

    def __init__(self, path: str | Path, offset: int, nbytes: int):
        self.path, self.offset, self.nbytes = str(path), int(offset), int(nbytes)
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.nbytes

    def _fileno(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def warm_page_cache(self) -> threading.Thread:
        """Read the bytes once, sequentially, in a background thread, so that the page cache holds them:
        random reads of a cold file are one small disk read each (no readahead), a sequential pass runs
        at disk speed (and at memory speed for the node's other ranks). Nothing is kept in the process."""
        def run(fd=os.open(self.path, os.O_RDONLY), offset=self.offset, end=self.offset + self.nbytes):
            buf = bytearray(4 << 20)
            try:
                while offset < end:
                    n = os.preadv(fd, [memoryview(buf)[:min(len(buf), end - offset)]], offset)
                    if n <= 0:
                        break
                    offset += n
            finally:
                os.close(fd)

        t = threading.Thread(target=run, name=f"warm {Path(self.path).name}", daemon=True)
        t.start()
        return t

    def __getitem__(self, s: slice) -> bytes:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("FileBytes supports contiguous slices only")
        a, b, _ = s.indices(self.nbytes)
        if b <= a:
            return b""
        data = os.pread(self._fileno(), b - a, self.offset + a)
        if len(data) != b - a:
            raise OSError(f"{self.path}: short read at offset {self.offset + a} ({len(data)} of {b - a} bytes)")
        return data

    def __getstate__(self) -> dict:
        return {"path": self.path, "offset": self.offset, "nbytes": self.nbytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def map_npz(path: str | Path, read_on_demand: Iterable[str] = ()) -> dict[str, np.ndarray | FileBytes]:
    """{member name without `.npy`: read-only ndarray view of the mapped file}; the 1-D uint8 members
    named in `read_on_demand` come as `FileBytes` instead (not mapped). Compressed members or object
    arrays are refused (nothing is unpickled)."""
    read_on_demand = set(read_on_demand)
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    out: dict[str, np.ndarray] = {}
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for zi in infos:
            if zi.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: member {zi.filename} is compressed and cannot be memory-mapped")
            sig, *_, n_name, n_extra = _LOCAL_HEADER.unpack_from(mm, zi.header_offset)
            if sig != b"PK\x03\x04":
                raise ValueError(f"{path}: bad local header of {zi.filename}")
            f.seek(zi.header_offset + _LOCAL_HEADER.size + n_name + n_extra)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: member {zi.filename} holds Python objects (refused, no pickle)")
            count = int(np.prod(shape, dtype=np.int64))
            name = zi.filename[:-4] if zi.filename.endswith(".npy") else zi.filename
            if name in read_on_demand:
                if dtype != np.uint8 or len(shape) != 1:
                    raise ValueError(f"{path}: member {zi.filename} ({dtype}, {shape}) is not a byte string")
                out[name] = FileBytes(path, f.tell(), count)
                continue
            arr = np.ndarray(shape, dtype=dtype, buffer=mm, offset=f.tell(), order="F" if fortran else "C") \
                if count else np.zeros(shape, dtype)
            arr.flags.writeable = False
            out[name] = arr
    return out
