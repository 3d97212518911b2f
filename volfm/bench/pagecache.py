"""The OS page cache, for benchmarks that must read from disk: evict files, and measure how much of one is cached.

    evict(paths)                 # posix_fadvise(POSIX_FADV_DONTNEED) on each file: no root needed
    resident_fraction(path)      # fraction of the file's pages in the page cache (mincore), None where unknown

Linux drops only clean pages that no process has mapped: a page still mapped by a live ``np.memmap`` (in this process
or any other) stays cached, and pages of a freshly written file stay until they are written back (:func:`flush`
first). So a cold read needs the previous reader's memmap closed, and workers that read different files.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

CAN_EVICT = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


def evict(paths: Iterable) -> None:
    """Ask the kernel to drop each file's clean, unmapped pages from the page cache (missing files are skipped)."""
    if not CAN_EVICT:
        raise OSError("page-cache eviction needs os.posix_fadvise (Linux)")
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def flush(paths: Iterable) -> None:
    """fsync each file, so that its pages are clean and :func:`evict` can drop them."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _LIBC = lib
    return _LIBC


def resident_fraction(path) -> float | None:
    """The fraction of ``path``'s pages that are in the page cache now (``mincore`` on a fresh read-only mapping,
    which touches no page), or None where that cannot be asked (not Linux, or the call fails)."""
    size = Path(path).stat().st_size
    if size == 0:
        return 0.0
    try:
        lib = _libc()
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n)()
            if lib.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / n
        finally:
            lib.munmap(addr, size)
    finally:
        os.close(fd)


def disk_read_bytes(diskstats="/proc/diskstats", sys_block="/sys/block") -> int | None:
    """Bytes read from the machine's block devices since boot (/proc/diskstats, every process), or None where that
    file is absent. The difference over an interval shows whether a "cold" figure really read from disk.

    Counted once each: the whole devices of ``/sys/block`` (partitions are not listed there, so their reads are
    counted in their disk's), leaving out loop, ram and zram devices (memory or a file already counted) and devices
    stacked on others -- device-mapper (LVM, dm-crypt) and md RAID, whose ``slaves/`` is not empty -- whose reads
    are counted again in the devices below them."""
    try:
        lines = Path(diskstats).read_text().splitlines()
        disks = {p.name for p in Path(sys_block).iterdir()}
    except OSError:
        return None
    total = 0
    for line in lines:
        f = line.split()
        if (len(f) > 5 and f[2] in disks and not f[2].startswith(("loop", "ram", "zram"))
                and not _stacked(Path(sys_block) / f[2])):
            total += int(f[5]) * 512  # sectors read, always in 512-byte units
    return total


def _stacked(dev: Path) -> bool:
    """Whether the block device ``dev`` (a /sys/block entry) sits on other devices (a non-empty ``slaves/``)."""
    try:
        return any(True for _ in (dev / "slaves").iterdir())
    except OSError:  # no slaves/ folder: a plain device
        return False


def readahead_kib(path) -> int | None:
    """The kernel's readahead window (KiB) for the device holding ``path`` (None where /sys does not say): a cold
    read of a file smaller than this may bring in the whole file, however little of it is asked for."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for p in (Path("/sys/class/bdi") / dev / "read_ahead_kb", Path("/sys/dev/block") / dev / "queue" / "read_ahead_kb"):
        try:
            return int(p.read_text().strip())
        except (OSError, ValueError):
            continue
    return None
