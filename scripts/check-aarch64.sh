#!/usr/bin/env bash
# Check fftmoe's edge runtime on emulated aarch64 boards: installs the project inside an arm64 Debian bookworm root
# the way docs/raspberry-pi.md tells a Raspberry Pi owner to, then, for each emulated core, runs `fftmoe-edge
# profile` and a short `fftmoe-edge train` of tier 2 on a tiny bundle exported on this host, and (with --join) has
# the emulated board join a one-round federation served from this host. Prints PASS/FAIL per check; exit 0 when
# every check passed, 1 when one failed, 2 on bad arguments.
#
#   sudo scripts/check-aarch64.sh [--root DIR] [--cpus "cortex-a72 cortex-a53"] [--epochs N] [--join] [--lock]
#
#   --root DIR    where the arm64 root and the work files live (default /var/tmp/fftmoe-aarch64; about 2 GB)
#   --cpus LIST   emulated cores: cortex-a72 = Raspberry Pi 4, cortex-a53 = Pi 3 / Zero 2 W, cortex-a76 = Pi 5
#   --epochs N    local epochs of the short training run (default 4; 10 steps each)
#   --join        also join a federation (`fftmoe-coordinator serve` on this host, one round) from the first core
#   --lock        install without constraints-aarch64.txt and rewrite it from what pip chose (pip freeze)
#
# Needs root (chroot, binfmt_misc), network access to PyPI and Debian, and the host's development environment
# (scripts/setup-venv.sh) for the export. The root is built with ../shared/tools/aarch64-root.sh, or the script
# named by AARCH64_ROOT_SH. Emulation is 15-60x slower than the boards: use this for pass/fail, never timings.
# A first run takes 30-60 minutes (building the root, installing torch under emulation); later runs reuse both.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd -P)"
ROOT_BASE=/var/tmp/fftmoe-aarch64
CPUS="cortex-a72 cortex-a53"
EPOCHS=4
JOIN=0
LOCK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT_BASE="$2"; shift 2 ;;
    --cpus) CPUS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --join) JOIN=1; shift ;;
    --lock) LOCK=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-aarch64: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "check-aarch64: run as root (it uses chroot and binfmt_misc)" >&2; exit 2; }
TOOL="${AARCH64_ROOT_SH:-$here/../shared/tools/aarch64-root.sh}"
[ -f "$TOOL" ] || { echo "check-aarch64: no $TOOL; set AARCH64_ROOT_SH to the aarch64-root.sh tool" >&2; exit 2; }
HOST_PY="${FFTMOE_VENV:-$here/.venv}/bin/python"
[ -x "$HOST_PY" ] || { echo "check-aarch64: no host environment at $HOST_PY: run scripts/setup-venv.sh first" >&2; exit 2; }

R="$ROOT_BASE/root"          # the arm64 root
W="$R/work"                  # shared with the root as /work
LOG="$ROOT_BASE/logs"; mkdir -p "$LOG"
results=()
pass() { results+=("PASS  $1"); echo "PASS  $1"; }
fail() { results+=("FAIL  $1"); echo "FAIL  $1"; }
verdict() { case "$2" in ok*) pass "$1: ${2#ok }" ;; *) fail "$1: ${2#bad }" ;; esac; }  # LABEL "ok ..."/"bad ..."
inside() { QEMU_CPU="$1" bash "$TOOL" run "$R" "${@:2}"; }
step() { echo; echo "== $* ($(date +%H:%M:%S))"; }

step "arm64 root in $R"
if [ ! -x "$R/usr/bin/python3" ]; then
  # aarch64-root.sh looks for the Debian mirror with grep over /etc/apt/sources.list and sources.list.d/*.sources
  # under pipefail: on a host with only deb822 sources (no sources.list) grep exits 2 and the tool stops without a
  # word. An empty sources.list changes nothing for apt and lets the lookup through.
  [ -e /etc/apt/sources.list ] || { echo "creating an empty /etc/apt/sources.list for aarch64-root.sh's mirror lookup"; touch /etc/apt/sources.list; }
  bash "$TOOL" init "$R" 2>&1 | tail -n 3 || true
  [ -x "$R/usr/bin/python3" ] || { echo "check-aarch64: building the arm64 root in $R failed (run: bash $TOOL init $R)" >&2; exit 1; }
fi

step "tiny bundle and data, exported on this host"
rm -rf "$W"; mkdir -p "$W"
(cd "$here" && "$HOST_PY" - "$W" <<'PY'
import subprocess, sys
from pathlib import Path
from tests.conftest import TINY_LABELS, make_tiny_bert, write_tiny_csv
w = Path(sys.argv[1])
make_tiny_bert(w / "tiny-bert")
# tiers 2 and 4 with measurements, so that `profile` on the board can choose between them
subprocess.run([str(Path(sys.executable).with_name("fftmoe-export")), "--model", str(w / "tiny-bert"), "--tiers", "2,4", "--experts", "4",
                "--expert-dim", "8", "--labels", ",".join(TINY_LABELS), "--max-seq-len", "16", "--out", str(w / "bundle"),
                "--json"], check=True, stdout=subprocess.DEVNULL)
write_tiny_csv(w / "data.csv", 180, seed=1)
print("bundle:", w / "bundle", "data:", w / "data.csv")
PY
)

step "copy the project (tracked files of the working tree) into the root"
mkdir -p "$W/fftmoe"
(cd "$here" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$W/fftmoe"

first_cpu="${CPUS%% *}"
step "install the documented way (emulated $first_cpu)"
if [ "$LOCK" = 1 ] || [ ! -f "$here/constraints-aarch64.txt" ]; then
  constraint=()
else
  constraint=(-c /work/fftmoe/constraints-aarch64.txt)
fi
# What docs/raspberry-pi.md says: a venv, then the edge runtime with its PyTorch backend, pinned by the aarch64 lock.
# A fresh environment every time (pip's download cache inside the root makes a repeat quicker).
if inside "$first_cpu" bash -c "set -e; rm -rf /opt/fftmoe; python3 -m venv /opt/fftmoe; /opt/fftmoe/bin/pip install -q --disable-pip-version-check \
      ${constraint[*]} '/work/fftmoe[edge-torch]'; /opt/fftmoe/bin/pip freeze --exclude fftmoe > /work/freeze.txt" \
      > "$LOG/install.log" 2>&1; then
  pass "install: pip install ${constraint[*]} 'fftmoe[edge-torch]' ($(grep -E '^torch==' "$W/freeze.txt"))"
  if [ "${#constraint[@]}" = 0 ]; then
    { echo "# aarch64 (Raspberry Pi OS bookworm / Debian 12 arm64, CPython 3.11) lock for 'fftmoe[edge-torch]',";
      echo "# written by scripts/check-aarch64.sh --lock on $(date +%F) from what pip installed; see docs/raspberry-pi.md.";
      cat "$W/freeze.txt"; } > "$here/constraints-aarch64.txt"
    echo "wrote $here/constraints-aarch64.txt"
  fi
else
  fail "install (see $LOG/install.log)"; tail -n 20 "$LOG/install.log"
fi

E=/opt/fftmoe/bin
for cpu in $CPUS; do
  step "$cpu: torch imports and multiplies"
  if inside "$cpu" $E/python -c "import platform, torch; a = torch.randn(256, 256); print(platform.machine(), 'torch', torch.__version__, float((a @ a).abs().sum()) > 0)" > "$LOG/$cpu-torch.log" 2>&1; then
    pass "$cpu: $(tail -n 1 "$LOG/$cpu-torch.log")"
  else
    fail "$cpu: torch ($(tail -n 1 "$LOG/$cpu-torch.log"))"
  fi

  step "$cpu: fftmoe-edge profile"
  if inside "$cpu" $E/fftmoe-edge profile --bundle /work/bundle --compute-seconds 2 --json > "$LOG/$cpu-profile.json" 2> "$LOG/$cpu-profile.err"; then
    summary=$("$HOST_PY" - "$LOG/$cpu-profile.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
d, c = p["device"], p.get("choice", {})
ok = d["arch"] == "aarch64" and p["backend"] == "torch" and c.get("tier") in (2, 4)
print(("ok" if ok else "bad"), f"arch {d['arch']}, {d['cores']} cores, {d['compute_gflops']} GFLOP/s, backend {p['backend']} "
      f"({p['backend_reason']}), tier {c.get('tier')}")
PY
) || summary="bad its output could not be read"
    verdict "$cpu: profile" "$summary"
  else
    fail "$cpu: profile exited $? ($(tail -n 2 "$LOG/$cpu-profile.err"))"
  fi

  step "$cpu: fftmoe-edge train --tier 2, $EPOCHS epochs"
  rm -rf "$W/run-$cpu"
  if inside "$cpu" $E/fftmoe-edge train --bundle /work/bundle --data /work/data.csv --out "/work/run-$cpu" --tier 2 \
       --epochs "$EPOCHS" --batch-size 16 --lr 0.01 --json > "$LOG/$cpu-train.json" 2> "$LOG/$cpu-train.err"; then
    summary=$("$HOST_PY" - "$LOG/$cpu-train.json" "$W/run-$cpu" <<'PY'
import json, os, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
losses = [h["train_loss"] for h in r["history"]]
files = all(os.path.exists(os.path.join(sys.argv[2], f)) for f in ("update.safetensors", "model/model.onnx"))
ok = r["ok"] and r["backend"] == "torch" and r["tier"] == 2 and len(losses) >= 2 and losses[-1] < losses[0] and files
acc = r["history"][-1].get("eval_accuracy")
print(("ok" if ok else "bad"), f"backend {r['backend']}, {r['steps']} steps, train loss by epoch "
      + " -> ".join(f"{x:.3f}" for x in losses) + (f", eval accuracy {acc:.2f}" if acc is not None else "")
      + ("" if files else ", update or model missing"))
PY
) || summary="bad its output could not be read"
    verdict "$cpu: train" "$summary"
  else
    fail "$cpu: train exited $? ($(tail -n 2 "$LOG/$cpu-train.err"))"
  fi
done

if [ "$JOIN" = 1 ]; then
  step "$first_cpu: fftmoe-edge join, one round served from this host"
  port=$("$HOST_PY" -c "from coordinator.deploy import free_port; print(free_port())")
  (cd "$here" && "${HOST_PY%/python}/fftmoe-coordinator" serve --bundle "$W/bundle" --state-dir "$W/serve" --rounds 1 \
      --min-clients 1 --local-steps 4 --batch-size 8 --round-timeout 1800 --wait-seconds 1800 --eval-every 0 \
      --host 127.0.0.1 --port "$port" --insecure --json > "$LOG/serve.json" 2> "$LOG/serve.err") &
  serve_pid=$!
  inside "$first_cpu" $E/fftmoe-edge join --server "127.0.0.1:$port" --insecure --data /work/data.csv \
      --cache-dir /work/join-cache --retry-seconds 60 > "$LOG/join.log" 2>&1 &
  join_pid=$!
  if wait "$serve_pid"; then
    summary=$("$HOST_PY" - "$LOG/serve.json" "$W/serve" <<'PY'
import json, re, sys
from pathlib import Path
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
h = json.loads((Path(sys.argv[2]) / "history.json").read_text())
node = re.search(r"node \d+: (tier \d+) .*?(backend \w+), .*?lacks (\d+) file\(s\)", (Path(sys.argv[2]) / "run.log").read_text())
accepted = len(h[-1]["accepted"]) if h else 0
peak = max((m.get("peak_rss_mb", 0) for m in h[-1]["client_metrics"].values()), default=0) if h else 0
ok = r.get("ok") and r["rounds_done"] == 1 and accepted == 1 and node and node.group(2) == "backend torch"
print(("ok" if ok else "bad"), f"{r.get('rounds_done')} round, {accepted} update merged from the emulated board"
      + (f" ({node.group(1)}, {node.group(2)}, {node.group(3)} bundle files fetched from the coordinator, peak RSS {peak:.0f} MB)" if node else ""))
PY
) || summary="bad its output could not be read"
    verdict "$first_cpu: join" "$summary"
  else
    fail "$first_cpu: join: serve failed ($(tail -n 2 "$LOG/serve.err"))"
  fi
  # With the coordinator gone, join must give up by itself: --retry-seconds 60, Flower's own retries, then exit 1.
  waited=0
  while kill -0 "$join_pid" 2>/dev/null && [ "$waited" -lt 240 ]; do sleep 5; waited=$((waited + 5)); done
  if kill -0 "$join_pid" 2>/dev/null; then
    fail "$first_cpu: join still running ${waited} s after the coordinator finished (stopped now)"
    pkill -TERM -f "fftmoe-edge join --server 127.0.0.1:$port" || true; sleep 5
    pkill -KILL -f "127.0.0.1:$port" || true
  else
    wait "$join_pid" && jc=0 || jc=$?
    if [ "$jc" = 1 ] && grep -q "no connection to 127.0.0.1:$port" "$LOG/join.log"; then
      pass "$first_cpu: join gave up by itself within ${waited} s of the coordinator's end (exit 1, 'no connection')"
    else
      fail "$first_cpu: join exited $jc after the coordinator's end ($(tail -n 1 "$LOG/join.log"))"
    fi
  fi
fi

echo
echo "== summary (logs in $LOG)"
printf '%s\n' "${results[@]}"
for r in "${results[@]}"; do case "$r" in FAIL*) exit 1 ;; esac; done
echo "all checks passed"
