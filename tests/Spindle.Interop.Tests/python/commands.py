"""Drives every NBD command against one writable Spindle export through libnbd, checking each result.

Usage: python3 commands.py URI SIZE
"""
import errno
import sys

import nbd

uri, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)

assert h.get_size() == size, h.get_size()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df", "can_multi_conn"):
    assert getattr(h, name)(), name
assert not h.is_read_only()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024

mib = 1024 * 1024

# WRITE (plain and FUA) and READ.
data = bytes((i * 7 + 3) % 251 + 1 for i in range(mib))
h.pwrite(data, 0)
h.pwrite(data[:65536], 4 * mib, nbd.CMD_FLAG_FUA)
assert h.pread(mib, 0) == data
assert h.pread(65536, 4 * mib) == data[:65536]

# FLUSH and CACHE.
h.flush()
h.cache(mib, 0)

# WRITE_ZEROES, with NO_HOLE and with FAST_ZERO.
h.zero(65536, 0)
h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 131072, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(196608, 0) == bytes(196608)
assert h.pread(65536, 196608) == data[196608:262144]

# TRIM (contents undefined afterwards; Spindle's backends read zeroes).
h.trim(65536, 262144)

# BLOCK_STATUS: the zeroed/trimmed head reads as a hole, the data after it as data.
extents = []


def on_extents(metacontext, offset, entries, err):
    assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
    extents.extend(zip(entries[0::2], entries[1::2]))
    return 0


h.block_status(mib, 0, on_extents)
assert sum(length for length, _ in extents) >= mib, extents
covered, saw_hole, saw_data = 0, False, False
for length, flags in extents:
    if covered < 196608:
        saw_hole |= bool(flags & nbd.STATE_HOLE)
    elif covered >= 327680 and covered < mib:
        saw_data |= flags == 0
    covered += length
assert saw_hole and saw_data, extents

# BLOCK_STATUS with REQ_ONE: exactly one extent, within the request.
one = []
h.block_status(mib, 0, lambda m, o, e, err: one.extend(zip(e[0::2], e[1::2])) or 0, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and one[0][0] <= mib, one

# A structured read of a hole gets a hole chunk, not data.
chunks = []


def on_chunk(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0


buf = h.pread_structured(mib, 8 * mib, on_chunk)
assert buf == bytes(mib)
assert chunks == [(8 * mib, mib, nbd.READ_HOLE)], chunks

# A read spanning data and hole: both kinds of chunks, reassembled correctly.
h.pwrite(data[:4096], 9 * mib)
chunks.clear()
buf = h.pread_structured(mib, 9 * mib, on_chunk)
assert buf[:4096] == data[:4096] and buf[4096:] == bytes(mib - 4096)
assert {status for _, _, status in chunks} == {nbd.READ_DATA, nbd.READ_HOLE}, chunks

# DF: exactly one content chunk even when data and hole mix.
chunks.clear()
buf = h.pread_structured(65536, 9 * mib, on_chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks
assert buf[:4096] == data[:4096]

# Many requests in flight at once, completed out of order, all correct.
handles = []
for i in range(64):
    handles.append(h.aio_pwrite(bytes([i + 1]) * 4096, 16 * mib + i * 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie in handles:
    assert h.aio_command_completed(cookie)
for i in range(64):
    assert h.pread(4096, 16 * mib + i * 4096) == bytes([i + 1]) * 4096

h.shutdown()
print("OK")
