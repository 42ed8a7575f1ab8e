"""Every error path: each request below must fail with the errno the NBD spec prescribes, and the connection must
keep working afterwards. libnbd's own client-side checks are switched off so the requests reach the server.

Usage: python3 errors.py WRITABLE_URI READ_ONLY_URI SIZE
"""
import errno
import sys

import nbd

rw_uri, ro_uri, size = sys.argv[1], sys.argv[2], int(sys.argv[3])


def expect(code, what, call, *args):
    try:
        call(*args)
    except nbd.Error as e:
        assert e.errnum == code, f"{what}: expected {errno.errorcode[code]}, got {e.errno} ({e.string})"
        return
    raise AssertionError(f"{what}: succeeded, expected {errno.errorcode[code]}")


ro = nbd.NBD()
ro.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
ro.set_strict_mode(0)
ro.connect_uri(ro_uri)
assert ro.is_read_only()
expect(errno.EPERM, "write to read-only", ro.pwrite, b"x" * 512, 0)
expect(errno.EPERM, "trim on read-only", ro.trim, 512, 0)
expect(errno.EPERM, "zero on read-only", ro.zero, 512, 0)
assert len(ro.pread(512, 0)) == 512
ro.shutdown()

h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_strict_mode(0)
h.connect_uri(rw_uri)
expect(errno.EINVAL, "read past the end", h.pread, 4096, size - 2048)
expect(errno.ENOSPC, "write past the end", h.pwrite, b"y" * 4096, size - 2048)
expect(errno.ENOSPC, "zero past the end", h.zero, 4096, size)
expect(errno.EINVAL, "trim past the end", h.trim, 4096, size)
expect(errno.EINVAL, "cache past the end", h.cache, 4096, size)
expect(errno.EINVAL, "block status past the end", h.block_status, 4096, size, lambda *a: 0)
expect(errno.EINVAL, "read over the maximum block size", h.pread, 64 * 1024 * 1024, 0)
expect(errno.EINVAL, "unknown flag", h.pread, 512, 0, 0x40)
expect(errno.EINVAL, "NO_HOLE on a read", h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE)

# Still in step after every refusal.
h.pwrite(b"z" * 4096, 0)
assert h.pread(4096, 0) == b"z" * 4096
h.shutdown()
print("OK")
