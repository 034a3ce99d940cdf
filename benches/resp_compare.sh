#!/usr/bin/env bash
# The RESP example (examples/resp.rs) next to redis-server 7 (--save "" --appendonly no) and
# tokio's mini-redis (crates.io), side by side in one run, interleaved round by round: each
# server on cpu $SERVER_CPU, every client on cpu $CLIENT_CPU (taskset).
#
# 1. redis-benchmark -c $CLIENTS -n $N -t <test> -P <p> for each of $TESTS and $PIPELINES:
#    requests/s, and the server's CPU (utime+stime from /proc/PID/stat) per request.
# 2. Pub/sub fan-out: $SUBS subscribers (benches/resp_clients.py: one socket each, counting the
#    bytes that arrive), one publisher (redis-benchmark -c 1 -P 16 -n $PUB_N PUBLISH ch <64 B>):
#    delivered messages/s (counted at the subscribers), the server's CPU per delivered message,
#    and its write calls (write, writev, sendto, sendmsg: perf's syscall tracepoints, or
#    strace -c where perf cannot, which slows the server) per delivered message.
# 3. $READERS readers of one $BIG_MB MiB value at once: the server's RSS before and its peak
#    while they read (sampled every 5 ms).
# 4. $IDLE idle clients: the server's RSS growth per client.
#
# Everything is a variable, so a smoke run is quick:
#   N=20000 PUB_N=2000 IDLE=500 BIG_MB=8 READERS=4 ROUNDS=1 benches/resp_compare.sh
# Raw rows go to benches/results/resp-<time>/raw.tsv, the markdown tables to summary.md there
# (and stdout). mini-redis is built once into target/mini-redis (cargo install); it has no
# PING (its rows say n/a), holds at most 250 connections, and is slow: it runs N/MINI_DIV
# requests and PUB_N/MINI_DIV publishes (rates stay comparable). SERVERS="resp redis" leaves it
# out.
#
# The full measurement, defaults as in issue 17 (about 7 minutes, plus about 5 the first time
# for building mini-redis): benches/resp_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000000}
CLIENTS=${CLIENTS:-50}
TESTS=${TESTS:-"set get ping_mbulk"}
PIPELINES=${PIPELINES:-"1 16"}
ROUNDS=${ROUNDS:-3}
SUBS=${SUBS:-50}
PUB_N=${PUB_N:-200000}
BIG_MB=${BIG_MB:-64}
READERS=${READERS:-20}
READ_KBPS=${READ_KBPS:-0} # 0: readers read as fast as they can
IDLE=${IDLE:-10000}
SERVERS=${SERVERS:-"resp redis mini"}
MINI_DIV=${MINI_DIV:-20} # mini-redis runs N/MINI_DIV requests and PUB_N/MINI_DIV publishes (it is slow)
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}

OUT=benches/results/resp-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT/redis-dir"
RAW=$OUT/raw.tsv
: >"$RAW"
CLIENTS_PY=benches/resp_clients.py
TCK=$(getconf CLK_TCK)
note() { echo "# $*" | tee -a "$OUT/notes.txt" >&2; }

for tool in redis-server redis-benchmark redis-cli taskset python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install redis-server redis-tools util-linux python3)" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((IDLE + 100)) ] || { echo "IDLE=$IDLE needs an fd limit above it (ulimit -n is $(ulimit -n))" >&2; exit 1; }

cargo build --release --example resp
RESP_BIN=target/release/examples/resp
MINI_BIN=target/mini-redis/bin/mini-redis-server
if [[ " $SERVERS " == *" mini "* ]] && [ ! -x "$MINI_BIN" ]; then
  if ! cargo install mini-redis --root target/mini-redis >"$OUT/mini-redis-install.log" 2>&1; then
    note "mini-redis did not build here (see mini-redis-install.log): left out"
    SERVERS=${SERVERS/mini/}
  fi
fi

# Syscall counting: perf's tracepoints if they work here (cheap), else strace -c (slow).
WRITES=(syscalls:sys_enter_write syscalls:sys_enter_writev syscalls:sys_enter_sendto syscalls:sys_enter_sendmsg)
if perf stat -e "$(IFS=,; echo "${WRITES[*]}")" -- true >/dev/null 2>&1; then
  COUNTER=perf
elif command -v strace >/dev/null; then
  COUNTER=strace
  note "perf's syscall tracepoints are not available: write calls counted with strace -c, which slows the server (its pub/sub rate and CPU are then not comparable)"
else
  COUNTER=none
  note "neither perf nor strace: write calls not counted"
fi
note "MINI_DIV=$MINI_DIV N=$N CLIENTS=$CLIENTS TESTS=$TESTS PIPELINES=$PIPELINES ROUNDS=$ROUNDS SUBS=$SUBS PUB_N=$PUB_N BIG_MB=$BIG_MB READERS=$READERS IDLE=$IDLE servers on cpu $SERVER_CPU, clients on cpu $CLIENT_CPU, counter=$COUNTER"
note "$(redis-server --version)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
cpu_seconds() { awk -v a="$1" -v b="$2" -v t="$TCK" 'BEGIN {printf "%.4f", (b - a) / t}'; }
SPID=""

start_server() { # NAME: sets SPID and PORT
  PORT=$(free_port)
  case $1 in
    resp) taskset -c "$SERVER_CPU" "$RESP_BIN" "127.0.0.1:$PORT" >"$OUT/resp.log" 2>&1 & ;;
    redis) taskset -c "$SERVER_CPU" redis-server --port "$PORT" --bind 127.0.0.1 --save "" \
      --appendonly no --daemonize no --loglevel warning --maxclients $((IDLE + 100)) \
      --dir "$OUT/redis-dir" >"$OUT/redis.log" 2>&1 & ;;
    mini) taskset -c "$SERVER_CPU" "$MINI_BIN" --port "$PORT" >/dev/null 2>&1 & ;;
  esac
  SPID=$!
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.02
  done
  echo "$1 did not start on $PORT" >&2
  exit 1
}
stop_server() {
  kill "$SPID" 2>/dev/null || true
  wait "$SPID" 2>/dev/null || true
  SPID=""
}
trap '[ -n "$SPID" ] && stop_server' EXIT

bench_rows() { # SERVER P ROUND
  local s=$1 p=$2 round=$3 t csv rps before after n=$N
  [ "$s" = mini ] && n=$((N / MINI_DIV))
  start_server "$s"
  for t in $TESTS; do
    if [ "$s" = mini ] && [ "$t" = ping_mbulk ]; then
      printf 'bench\t%s\t%s\tP%s\t%s\tn/a\t0\t%s\n' "$s" "$t" "$p" "$round" "$n" >>"$RAW"
      continue
    fi
    before=$(cpu_ticks "$SPID")
    csv=$(taskset -c "$CLIENT_CPU" redis-benchmark -h 127.0.0.1 -p "$PORT" -c "$CLIENTS" -n "$n" \
      -P "$p" -t "$t" --csv 2>>"$OUT/redis-benchmark.stderr")
    after=$(cpu_ticks "$SPID")
    rps=$(echo "$csv" | awk -F'","' 'NR > 1 {print $2; exit}')
    printf 'bench\t%s\t%s\tP%s\t%s\t%s\t%s\t%s\n' "$s" "$t" "$p" "$round" "${rps:-n/a}" \
      "$(cpu_seconds "$before" "$after")" "$n" >>"$RAW"
    echo "$s $t -P $p round $round: ${rps:-n/a} req/s" >&2
  done
  stop_server
}

fanout_row() { # SERVER ROUND
  local s=$1 round=$2 msg frame_len before after got delivered seconds writes counter_pid fifo
  local pub_n=$PUB_N
  [ "$s" = mini ] && pub_n=$((PUB_N / MINI_DIV))
  msg=$(printf 'm%.0s' $(seq 64))
  frame_len=$(( ${#msg} + 32 )) # *3 $7 message $2 ch $64 <msg>: 17 + 8 + 5 + 64 + 2
  start_server "$s"
  fifo=$OUT/subscribers.out
  taskset -c "$CLIENT_CPU" python3 "$CLIENTS_PY" subscribe "$PORT" "$SUBS" ch "$frame_len" "$pub_n" >"$fifo" &
  local sub_pid=$!
  for _ in $(seq 500); do grep -q ready "$fifo" 2>/dev/null && break; sleep 0.02; done
  grep -q ready "$fifo" || { echo "the subscribers did not subscribe on $s" >&2; exit 1; }
  case $COUNTER in
    perf) perf stat -x, -e "$(IFS=,; echo "${WRITES[*]}")" -p "$SPID" -o "$OUT/writes.$s.txt" & counter_pid=$! ;;
    strace) strace -c -f -e trace=write,writev,sendto,sendmsg -p "$SPID" -o "$OUT/writes.$s.txt" & counter_pid=$! ;;
    none) counter_pid="" ;;
  esac
  sleep 0.3 # the counter attaches
  before=$(cpu_ticks "$SPID")
  taskset -c "$CLIENT_CPU" redis-benchmark -h 127.0.0.1 -p "$PORT" -c 1 -P 16 -n "$pub_n" -q \
    PUBLISH ch "$msg" >/dev/null 2>>"$OUT/redis-benchmark.stderr"
  wait "$sub_pid" || true
  after=$(cpu_ticks "$SPID")
  if [ -n "$counter_pid" ]; then
    kill -INT "$counter_pid" 2>/dev/null || true
    wait "$counter_pid" 2>/dev/null || true
  fi
  got=$(grep messages= "$fifo" || true)
  delivered=$(echo "$got" | sed 's/.*messages=\([0-9]*\).*/\1/')
  seconds=$(echo "$got" | sed 's/.*seconds=\([0-9.]*\).*/\1/')
  case $COUNTER in
    perf) writes=$(awk -F, '/sys_enter_/ {n += $1} END {print n + 0}' "$OUT/writes.$s.txt") ;;
    strace) writes=$(awk '$NF ~ /^(write|writev|sendto|sendmsg)$/ {n += $4} END {print n + 0}' "$OUT/writes.$s.txt") ;;
    none) writes=n/a ;;
  esac
  printf 'pubsub\t%s\tfanout\t%s\t%s\t%s\t%s\t%s\n' "$s" "$round" "${delivered:-0}" "${seconds:-0}" \
    "$(cpu_seconds "$before" "$after")" "$writes" >>"$RAW"
  echo "$s fan-out round $round: $delivered messages delivered in ${seconds}s, $writes write calls" >&2
  stop_server
}

bigget_row() { # SERVER ROUND
  local s=$1 round=$2 got
  start_server "$s"
  taskset -c "$CLIENT_CPU" python3 "$CLIENTS_PY" setbig "$PORT" big "$BIG_MB"
  sleep 0.5
  got=$(taskset -c "$CLIENT_CPU" python3 "$CLIENTS_PY" readers "$PORT" "$READERS" big "$SPID" "$READ_KBPS")
  printf 'bigget\t%s\treaders\t%s\t%s\n' "$s" "$(echo "$got" | sed 's/idle_kib=\([0-9]*\).*/\1/')" \
    "$(echo "$got" | sed 's/.*peak_kib=\([0-9]*\).*/\1/')" >>"$RAW"
  echo "$s $READERS readers of $BIG_MB MiB: $got" >&2
  stop_server
}

idle_row() { # SERVER ROUND
  local s=$1 round=$2 got n=$IDLE
  if [ "$s" = mini ] && [ "$n" -gt 240 ]; then
    n=240 # mini-redis holds at most 250 connections (a semaphore); more wait in the backlog
    note "mini-redis's idle clients: measured at $n (it accepts at most 250)"
  fi
  start_server "$s"
  got=$(taskset -c "$CLIENT_CPU" python3 "$CLIENTS_PY" idle "$PORT" "$n" "$SPID")
  printf 'idle\t%s\tclients\t%s\t%s\n' "$s" "$(echo "$got" | sed 's/per_client_bytes=\([0-9.]*\).*/\1/')" "$got" >>"$RAW"
  echo "$s $IDLE idle clients: $got" >&2
  stop_server
}

for round in $(seq "$ROUNDS"); do
  for p in $PIPELINES; do
    for s in $SERVERS; do bench_rows "$s" "$p" "$round"; done
  done
  for s in $SERVERS; do fanout_row "$s" "$round"; done
done
for s in $SERVERS; do bigget_row "$s" 1; done
for s in $SERVERS; do idle_row "$s" 1; done

python3 "$CLIENTS_PY" summarize "$RAW" | tee "$OUT/summary.md"
echo "raw results: $RAW" >&2
