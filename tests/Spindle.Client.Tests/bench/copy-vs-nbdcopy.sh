#!/usr/bin/env bash
# spindle copy against nbdcopy on the same source and destination, in the same run, alternating.
# Source: nbdkit file plugin serving a random-data image; destination: nbdkit memory, or a file.
# Usage: tests/Spindle.Client.Tests/bench/copy-vs-nbdcopy.sh [ROUNDS] [SIZE]   (defaults: 5 rounds, 1G)
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
rounds="${1:-5}"
size="${2:-1G}"
spindle="$root/spindle"
work="$(mktemp -d /tmp/spindle-copy-bench.XXXXXX)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$spindle" --help > /dev/null   # build first, outside the timings
head -c "$size" /dev/urandom > "$work/source.img"
bytes=$(stat -c %s "$work/source.img")
p1=$(free_port); p2=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$p1" file "$work/source.img" & pids+=($!)
nbdkit -f -i 127.0.0.1 -p "$p2" memory "$bytes" & pids+=($!)
sleep 1
src="nbd://127.0.0.1:$p1/"; dst="nbd://127.0.0.1:$p2/"
cat "$work/source.img" > /dev/null   # page cache warm for both tools

times="$work/times"
run() { # label command...
  local label="$1"; shift
  /usr/bin/time -a -o "$times" -f "$label %e %U %S" "$@" > /dev/null
}
for _ in $(seq 1 "$rounds"); do
  run "nbdcopy   nbd->nbd " nbdcopy "$src" "$dst"
  run "spindle   nbd->nbd " "$spindle" copy -q --no-progress "$src" "$dst"
  rm -f "$work/a.img" "$work/b.img"
  run "nbdcopy   nbd->file" nbdcopy "$src" "$work/a.img"
  run "spindle   nbd->file" "$spindle" copy -q --no-progress "$src" "$work/b.img"
  run "nbdcopy   file->nbd" nbdcopy "$work/source.img" "$dst"
  run "spindle   file->nbd" "$spindle" copy -q --no-progress "$work/source.img" "$dst"
done
cmp "$work/source.img" "$work/b.img"
nbdcopy "$dst" "$work/check.img" && cmp "$work/source.img" "$work/check.img"

echo "$rounds rounds, $bytes bytes, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); median wall time and MiB/s (whole process, startup included), median CPU s"
python3 - "$times" "$bytes" <<'PY'
import sys, statistics, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    parts = line.split()
    label = " ".join(parts[:2]); wall, user, sys_ = map(float, parts[2:5])
    runs[label].append((wall, user + sys_))
size = int(sys.argv[2])
for label in sorted(runs, key=lambda l: (l.split()[1], l.split()[0])):
    walls = [w for w, _ in runs[label]]; cpus = [c for _, c in runs[label]]
    wall = statistics.median(walls)
    print(f"{label:20} {wall:6.2f} s  {size / wall / 2**20:7.1f} MiB/s  cpu {statistics.median(cpus):5.2f} s   (walls: {' '.join(f'{w:.2f}' for w in walls)})")
PY
