#!/usr/bin/python3
"""A writer for the dirty bitmap kill -9 test, through libnbd: random writes, WRITE_ZEROES and trims over the whole
export, several in flight, until the connection dies or the time runs out.

usage: bitmap_writer.py URI SEED SECONDS

Output, one line per event, flushed at once:
  A KIND OFFSET LENGTH   acknowledged (KIND w write, z zero, t trim): its range must be dirty in the bitmap
  E KIND ERRNO           a request failed otherwise than by the server dying (the test fails)
"""
import random
import sys
import time

import nbd

DEPTH = 16
CONNECTION_LOST = {32, 103, 104, 107, 108}  # EPIPE, ECONNABORTED, ECONNRESET, ENOTCONN, ESHUTDOWN: the server died

uri, seed, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
completed = []


def done(kind, offset, length):
    def callback(error):
        completed.append((kind, offset, length, error.value))
        return 1
    return callback


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report():
    for kind, offset, length, error in completed:
        if error == 0:
            out(f"A {kind} {offset} {length}")
    for kind, offset, length, error in completed:
        if error in CONNECTION_LOST:
            sys.exit(0)
        if error != 0:
            out(f"E {kind} {error}")
            sys.exit(1)
    completed.clear()


deadline = time.monotonic() + seconds
try:
    while time.monotonic() < deadline:
        while h.aio_in_flight() < DEPTH:
            length = rng.randint(1, 256 * 1024)
            offset = rng.randrange(size - length)
            kind = rng.choices("wzt", weights=[6, 2, 2])[0]
            if kind == "w":
                h.aio_pwrite(rng.randbytes(length), offset, completion=done(kind, offset, length))
            elif kind == "z":
                h.aio_zero(length, offset, completion=done(kind, offset, length))
            else:
                h.aio_trim(length, offset, completion=done(kind, offset, length))
        h.poll(-1)
        report()
except nbd.Error:
    report()  # the server was killed: what was acknowledged before still counts
    sys.exit(0)
