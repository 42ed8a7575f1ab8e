#!/usr/bin/env bash
# Throughput of the device layer, side by side with its ceiling (fio on the image file directly) and a peer
# (libnbd's nbdfuse over nbdkit's memory plugin): sequential 1 MiB and random 4 KiB, read and write, direct I/O,
# libaio, queue depth 16/32. Needs root, fio, nbdfuse, nbdkit; builds spindle (Release) on first use.
#
#   tests/Spindle.Fuse.Tests/bench/fio-devices.sh [SECONDS_PER_RUN] [SIZE]
#
# Layers measured:
#   file:direct     fio on the image file with O_DIRECT (ext4 on this machine's disk)
#   file:cached     fio on the image file through the page cache, 4 jobs (the file backend's own path: it uses
#                   buffered pread/pwrite, so this is its ceiling)
#   fuse:file       DIR/disk of `spindle mount IMAGE DIR`
#   loop:file       the loop device of `spindle attach IMAGE` (direct I/O on DIR/disk)
#   fuse:memory     `spindle mount memory:SIZE`: the FUSE layer's own ceiling
#   loop:memory     `spindle attach memory:SIZE`
#   nbdfuse:memory  nbdfuse + nbdkit memory, the peer (FUSE through libfuse and an NBD socket)
set -euo pipefail
runtime="${1:-5}"
size="${2:-1G}"
root="$(cd "$(dirname "$0")/../../.." && pwd)"
spindle="$root/spindle"
work="$(mktemp -d /tmp/spindle-bench.XXXXXX)"
image="$work/disk.img"
mounts=()
attached=()
pids=()

cleanup() {
  for name in "${attached[@]}"; do "$spindle" detach "$name" >/dev/null 2>&1 || true; done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for dir in "${mounts[@]}"; do umount -l "$dir" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$spindle" --help >/dev/null
truncate -s "$size" "$image"
dd if=/dev/urandom of="$image" bs=1M count=256 conv=notrunc,fsync status=none

run() { # label target [fio options...]
  local label="$1" target="$2"
  shift 2
  local engine=("--direct=1" "--ioengine=libaio")
  [ $# -gt 0 ] && engine=("$@")
  for job in "write 1M 16" "read 1M 16" "randwrite 4k 32" "randread 4k 32"; do
    set -- $job
    fio --name=bench --filename="$target" --rw="$1" --bs="$2" --iodepth="$3" "${engine[@]}" \
        --size=256M --runtime="$runtime" --time_based --group_reporting --output-format=json 2>/dev/null |
      python3 -c '
import json, sys
text = sys.stdin.read()
job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes before the JSON
side = job["read"] if job["read"]["io_bytes"] else job["write"]
bw, iops = side["bw"] / 1024, side["iops"]
print(f"{sys.argv[1]:16} {sys.argv[2]:10} {sys.argv[3]:>3} {bw:10.0f} MiB/s {iops:10.0f} IOPS")
' "$label" "$1" "$2"
  done
}

mount_spindle() { # source dir
  mkdir -p "$2"; mounts+=("$2")
  "$spindle" mount -q "$1" "$2" >/dev/null &
  pids+=($!)
  for _ in $(seq 100); do [ -e "$2/disk" ] && return; sleep 0.1; done
  echo "spindle mount $1 did not come up" >&2; exit 1
}

printf '%-16s %-10s %3s %16s %15s\n' layer pattern bs throughput rate
run file:direct "$image"
run file:cached "$image" --direct=0 --ioengine=psync --numjobs=4

mount_spindle "$image" "$work/m-file"
run fuse:file "$work/m-file/disk"
kill "${pids[-1]}"; sleep 1

name="bench-$$"; attached+=("$name")
loop=$("$spindle" attach -q --device fuse --name "$name" "$image")
run loop:file "$loop"
"$spindle" detach "$name" 2>/dev/null

mount_spindle "memory:$size" "$work/m-memory"
run fuse:memory "$work/m-memory/disk"
kill "${pids[-1]}"; sleep 1

name="bench-mem-$$"; attached+=("$name")
loop=$("$spindle" attach -q --device fuse --name "$name" "memory:$size")
run loop:memory "$loop"
"$spindle" detach "$name" 2>/dev/null

if command -v nbdfuse >/dev/null && command -v nbdkit >/dev/null; then
  mkdir -p "$work/n"; mounts+=("$work/n")
  nbdfuse "$work/n" --command nbdkit -s memory "$size" &
  pids+=($!)
  for _ in $(seq 100); do [ -e "$work/n/nbd" ] && break; sleep 0.1; done
  run nbdfuse:memory "$work/n/nbd"
fi
