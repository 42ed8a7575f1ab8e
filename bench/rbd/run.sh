#!/usr/bin/env bash
# Side-by-side benchmark of NBD servers on one Ceph RBD image: Spindle's rbd backend against qemu-nbd with its rbd
# driver (qemu-block-extra), same image, same fio workloads (fio's nbd engine), interleaved in one run so both
# see the same machine load. Medians of ROUNDS runs per server and workload.
#
#   bench/rbd/run.sh [ROUNDS] [RUNTIME_SECONDS]      defaults: 3 rounds, 10 s per workload
#
# Starts its own throwaway cluster (scripts/ceph-cluster.sh; memstore, so RAM-backed OSD), creates a 1 GiB image,
# fills it (so reads reach real objects), and writes bench/results/rbd-<time>.json plus a markdown table on
# standard output. Both servers run with librbd's cache off (Spindle's default; qemu-nbd --cache=none).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"

rounds="${1:-3}"
runtime="${2:-10}"
image_size="1G"
python=/usr/bin/python3

for tool in fio qemu-nbd rbd; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
[ -f /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ] || [ -n "$(find /usr/lib -name 'block-rbd.so' -print -quit 2>/dev/null)" ] || {
  echo "bench: qemu's rbd driver is missing: apt install qemu-block-extra" >&2
  exit 1
}

work="$(mktemp -d /tmp/spindle-bench-rbd.XXXXXX)"
cluster="$work/ceph"
results="$root/bench/results"
mkdir -p "$results"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
raw="$work/raw.jsonl"
server_pid=""

cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null || true
  fi
  [ -f "$cluster/ceph.conf" ] && scripts/ceph-cluster.sh stop "$cluster" || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== building Spindle (Release)" >&2
dotnet build src/Spindle.Cli/Spindle.Cli.csproj -c Release -nologo -v quiet >&2
spindle="$root/src/Spindle.Cli/bin/Release/net10.0/spindle"

echo "== starting a throwaway Ceph cluster" >&2
CEPH_MEMSTORE_BYTES=$((8 << 30)) scripts/ceph-cluster.sh start "$cluster" --watch $$ >/dev/null
conf="$cluster/ceph.conf"
keyring="$cluster/ceph.client.admin.keyring"
rbd_cmd=(rbd --conf "$conf" --keyring "$keyring" --id admin)
"${rbd_cmd[@]}" create --size "$image_size" rbd/bench
echo "== filling the image" >&2
"${rbd_cmd[@]}" bench --io-type write --io-size 4M --io-threads 4 --io-total "$image_size" --io-pattern seq rbd/bench >/dev/null

socket="$work/nbd.sock"

start_server() {
  rm -f "$socket"
  case "$1" in
    spindle)
      "$spindle" serve "rbd:rbd/bench:conf=$conf:keyring=$keyring:id=admin" --unix "$socket" -q >"$work/server.log" 2>&1 &
      ;;
    qemu-nbd)
      qemu-nbd -f raw --cache=none -t -k "$socket" -x '' "rbd:rbd/bench:conf=$conf:keyring=$keyring:id=admin" >"$work/server.log" 2>&1 &
      ;;
  esac
  server_pid=$!
  for _ in $(seq 300); do
    [ -S "$socket" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "bench: $1 did not start:" >&2
  cat "$work/server.log" >&2
  exit 1
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

# name rw bs iodepth
workloads=(
  "randread-4k-qd32 randread 4k 32"
  "randwrite-4k-qd32 randwrite 4k 32"
  "read-1m-qd8 read 1M 8"
  "write-1m-qd8 write 1M 8"
)

run_fio() {
  local server="$1" round="$2" name="$3" rw="$4" bs="$5" depth="$6"
  local out="$work/fio.json"
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$socket" --rw="$rw" --bs="$bs" --iodepth="$depth" \
    --numjobs=1 --time_based --runtime="$runtime" --ramp_time=2 --size="$image_size" --output-format=json --output="$out" >/dev/null
  "$python" - "$out" "$server" "$round" "$name" >>"$raw" <<'EOF'
import json, sys
path, server, rnd, name = sys.argv[1:5]
job = json.load(open(path))["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
print(json.dumps({"server": server, "round": int(rnd), "workload": name, "iops": side["iops"], "mib_s": side["bw_bytes"] / 1048576}))
EOF
}

for round in $(seq "$rounds"); do
  # Alternate who goes first, so neither always runs on a warmer (or more loaded) cluster.
  if [ $((round % 2)) -eq 1 ]; then order=(spindle qemu-nbd); else order=(qemu-nbd spindle); fi
  for server in "${order[@]}"; do
    echo "== round $round/$rounds: $server" >&2
    start_server "$server"
    for workload in "${workloads[@]}"; do
      # shellcheck disable=SC2086
      run_fio "$server" "$round" $workload
    done
    stop_server
  done
done

"$python" - "$raw" "$results/rbd-$stamp.json" "$rounds" "$runtime" <<'EOF'
import json, statistics, sys
raw, out, rounds, runtime = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [json.loads(line) for line in open(raw)]
workloads = list(dict.fromkeys(r["workload"] for r in rows))
summary = {}
for w in workloads:
    for s in ("spindle", "qemu-nbd"):
        runs = [r for r in rows if r["workload"] == w and r["server"] == s]
        summary.setdefault(w, {})[s] = {"iops": statistics.median(r["iops"] for r in runs),
                                        "mib_s": statistics.median(r["mib_s"] for r in runs),
                                        "runs": [round(r["iops"]) for r in runs]}
json.dump({"rounds": rounds, "runtime_s": runtime, "raw": rows, "median": summary}, open(out, "w"), indent=2)
print(f"RBD image, 1 GiB, memstore OSD on this machine; medians of {rounds} interleaved rounds, {runtime} s each (fio nbd engine, 1 job)\n")
print("| workload | Spindle IOPS | Spindle MiB/s | qemu-nbd IOPS | qemu-nbd MiB/s | Spindle / qemu-nbd |")
print("|---|---:|---:|---:|---:|---:|")
for w in workloads:
    sp, qn = summary[w]["spindle"], summary[w]["qemu-nbd"]
    ratio = sp["iops"] / qn["iops"] if qn["iops"] else float("nan")
    print(f"| {w} | {sp['iops']:.0f} | {sp['mib_s']:.1f} | {qn['iops']:.0f} | {qn['mib_s']:.1f} | {ratio:.2f} |")
print(f"\nraw results: {out}")
EOF
