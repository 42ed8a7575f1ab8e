#!/usr/bin/python3
"""A writer for the kill -9 test, through libnbd: writes and zeroes into fixed slots with FUA or followed by
FLUSH, several in flight, until the connection dies or the time runs out.

usage: qcow2_writer.py URI SLOTS SLOT_SIZE FIRST_GENERATION SEED SECONDS

Each request covers the start of one slot (512 bytes to the whole slot); no two requests in flight share a slot.
Every 512-byte sector written carries: magic, generation, slot, sector index (4 x int64 LE), then 480 bytes of
(generation + sector) & 0xff, so a reader can tell which request's bytes a sector holds. Zeroes write all-zero
sectors. Output, one line per event, flushed at once:
  I SLOT GEN SECTORS KIND   issued (KIND w for a write, z for WRITE_ZEROES)
  D SLOT GEN                durable: acknowledged with FUA, or acknowledged before a FLUSH that has completed
  E KIND ERRNO              a request failed (the test fails); X ...: the connection was lost (the server killed)
"""
import random
import struct
import sys
import time

import nbd

MAGIC = 0x5350494E444C4531  # "SPINDLE1"
DEPTH = 8
CONNECTION_LOST = {32, 103, 104, 107, 108}  # EPIPE, ECONNABORTED, ECONNRESET, ENOTCONN, ESHUTDOWN: the server died

uri, slots, slot_size, generation, seed, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)

busy = set()          # slots with a request in flight
acked = []            # (slot, gen) acknowledged without FUA, not yet covered by a completed flush
completed = []        # completions to handle: (kind, payload, error)


def sector(gen, slot, index):
    return struct.pack("<QqqQ", MAGIC, gen, slot, index) + bytes([(gen + index) & 0xFF]) * 480


def done(kind, payload):
    def callback(error):
        completed.append((kind, payload, error.value))
        return 1
    return callback


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


deadline = time.monotonic() + seconds
since_flush = 0
try:
    while time.monotonic() < deadline:
        while h.aio_in_flight() < DEPTH and len(busy) < slots:
            if since_flush >= 12 and rng.random() < 0.5:
                h.aio_flush(completion=done("f", list(acked)))
                acked.clear()
                since_flush = 0
                continue
            slot = rng.randrange(slots)
            while slot in busy:
                slot = rng.randrange(slots)
            sectors = rng.randint(1, slot_size // 512)
            fua = rng.random() < 0.3
            flags = nbd.CMD_FLAG_FUA if fua else 0
            generation += 1
            busy.add(slot)
            zero = rng.random() < 0.1
            out(f"I {slot} {generation} {sectors} {'z' if zero else 'w'}")
            if zero:
                h.aio_zero(sectors * 512, slot * slot_size, completion=done("w", (slot, generation, fua)), flags=flags)
            else:
                data = b"".join(sector(generation, slot, i) for i in range(sectors))
                h.aio_pwrite(data, slot * slot_size, completion=done("w", (slot, generation, fua)), flags=flags)
            since_flush += 1
        h.poll(-1)
        for kind, payload, error in completed:
            if error in CONNECTION_LOST:
                out(f"X {kind} {error}")
                sys.exit(2)
            if error != 0:
                out(f"E {kind} {error}")
                sys.exit(1)
            if kind == "f":
                for slot, gen in payload:
                    out(f"D {slot} {gen}")
            else:
                slot, gen, fua = payload
                busy.discard(slot)
                if fua:
                    out(f"D {slot} {gen}")
                else:
                    acked.append((slot, gen))
        completed.clear()
except nbd.Error as error:
    out(f"X {error}")
    sys.exit(2)
out("END")
