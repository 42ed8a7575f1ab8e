#!/usr/bin/env bash
# Side-by-side fio figures for a 1 GiB qcow2 image served by Spindle (the native binary) and by
# qemu-nbd -f qcow2 --cache=writeback: the same image kinds and fio workloads as bench/run's qcow2 rows.
# Usage: scripts/bench-qcow2.sh [ROUNDS=3] [SECONDS=10] [IMAGES="full half"] [WORKLOADS="..."]
# Servers alternate within each round (the machine may be shared: compare within one run). Every write run
# starts from a fresh copy of the image, so allocating writes are measured as such. Prints one line per run
# and the median per server; results go to $OUT (default: a temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
seconds="${2:-10}"
images="${IMAGES:-full half}"
workloads="${WORKLOADS:-randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8 write-1m-qd8}"
spindle="${SPINDLE_CLI:-$PWD/artifacts/spindle/spindle}"
[ -x "$spindle" ] || ./spindle --version >/dev/null
out="${OUT:-$(mktemp -d /tmp/bench-qcow2.XXXXXX)}"
mkdir -p "$out"
port=$((20000 + RANDOM % 20000))
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# full: every cluster allocated; half: every other MiB allocated (a converted sparse file), 64 KiB clusters.
make_image() {
  local kind=$1 raw="$out/$1.raw"
  [ -f "$out/$kind.qcow2" ] && return
  truncate -s 1G "$raw"
  if [ "$kind" = full ]; then
    head -c 1G /dev/urandom >"$raw"
  else
    for ((i = 0; i < 1024; i += 2)); do
      dd if=/dev/urandom of="$raw" bs=1M seek=$i count=1 conv=notrunc status=none
    done
  fi
  qemu-img convert -q -f raw -O qcow2 -o cluster_size=65536 "$raw" "$out/$kind.qcow2"
  rm -f "$raw"
}

start_server() {
  local server=$1 image=$2
  if [ "$server" = spindle ]; then
    "$spindle" serve --bind 127.0.0.1 --port "$port" --quiet "$image" >"$out/spindle.log" 2>&1 &
  else
    qemu-nbd -f qcow2 --cache=writeback --shared=0 --persistent -b 127.0.0.1 -p "$port" "$image" >"$out/qemu-nbd.log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "$server did not start" >&2; exit 1
}

stop_server() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }

run_fio() {
  local name=$1 rw bs depth
  IFS=- read -r rw bs depth <<<"$name"
  depth=${depth#qd}
  fio --name="$name" --ioengine=nbd --uri="nbd://127.0.0.1:$port/" --rw="$rw" --bs="$bs" --iodepth="$depth" \
    --numjobs=1 --time_based --runtime="$seconds" --ramp_time=1 --output-format=json --output="$out/fio.json" >/dev/null
  python3 - "$out/fio.json" "$rw" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["write" if "write" in sys.argv[2] else "read"]
print(f'{side["iops"]:.0f} {side["bw_bytes"] / 1048576:.0f}')
EOF
}

: >"$out/results.txt"
printf '%-6s %-18s %-8s %5s %10s %8s\n' image workload server round IOPS MiB/s
for kind in $images; do
  make_image "$kind"
  for workload in $workloads; do
    for round in $(seq "$rounds"); do
      for server in spindle qemu-nbd; do
        image="$out/$kind.qcow2"
        if [[ "$workload" == *write* ]]; then
          cp --sparse=always "$out/$kind.qcow2" "$out/run.qcow2"
          image="$out/run.qcow2"
        fi
        start_server "$server" "$image"
        read -r iops mibs < <(run_fio "$workload")
        stop_server
        printf '%-6s %-18s %-8s %5s %10s %8s\n' "$kind" "$workload" "$server" "$round" "$iops" "$mibs" | tee -a "$out/results.txt"
        if [[ "$workload" == *write* ]]; then
          qemu-img check -q "$image" || { echo "qemu-img check failed after $server $workload" >&2; exit 1; }
        fi
      done
    done
  done
done

echo "== medians (IOPS, MiB/s)"
python3 - "$out/results.txt" <<'EOF'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    image, workload, server, _, iops, mibs = line.split()
    rows[(image, workload, server)].append((float(iops), float(mibs)))
for (image, workload) in dict.fromkeys((k[0], k[1]) for k in rows):
    s = rows[(image, workload, "spindle")]; q = rows[(image, workload, "qemu-nbd")]
    si, qi = statistics.median(r[0] for r in s), statistics.median(r[0] for r in q)
    sb, qb = statistics.median(r[1] for r in s), statistics.median(r[1] for r in q)
    print(f"{image:6} {workload:18} spindle {si:9.0f} IOPS {sb:7.0f} MiB/s | qemu-nbd {qi:9.0f} IOPS {qb:7.0f} MiB/s | x{si / qi:.2f}")
EOF
echo "results in $out"
