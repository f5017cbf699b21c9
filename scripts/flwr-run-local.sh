#!/usr/bin/env bash
# Run fedpt's ServerApp/ClientApp through Flower's own CLI (`flwr run .`) on this machine:
# a SuperLink in simulation mode on loopback, started by hand so that Flower does not try to
# install the app's dependencies into a fresh env (which would pull a CUDA torch), then stopped.
#
#   scripts/flwr-run-local.sh [NUM_SUPERNODES] [RUN_CONFIG]
#   scripts/flwr-run-local.sh 3 'preset="tiny" set="" systems="fedpt" out="/tmp/flwr-out" overwrite=true'
#
# NUM_SUPERNODES must equal the config's federation.num_clients (pyproject's default `set` makes it 2).
# On exit it stops exactly what it started: the SuperLink and the processes (and process groups)
# the SuperLink detached, listed by PID before anything is stopped; nothing is killed by name.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${1:-2}
RUN_CONFIG=${2:-'preset="tiny" systems="fedpt" out="runs/flwr" overwrite=true'}
export PATH="$PWD/.venv/bin:$PATH" FLWR_TELEMETRY_ENABLED=0
# A free port unless FEDPT_SUPERLINK_PORT names one (other people's SuperLinks may share this host).
PORT=${FEDPT_SUPERLINK_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# An occupied port would make the SuperLink die after start-up with a long traceback: say it first.
# Only EADDRINUSE means "in use" (exit 3); anything else (no python, a bad port) is its own error.
if ! command -v python >/dev/null; then
    echo "error: no python on PATH: activate fedpt's virtual environment first" >&2
    exit 2
fi
PORT_CHECK='
import errno, socket, sys
try:
    socket.socket().bind(("127.0.0.1", int(sys.argv[1])))
except OSError as err:
    sys.exit(3 if err.errno == errno.EADDRINUSE else f"error: cannot bind 127.0.0.1:{sys.argv[1]}: {err}")
except ValueError:
    sys.exit(f"error: FEDPT_SUPERLINK_PORT={sys.argv[1]!r} is not a port number")
'
status=0
python -c "$PORT_CHECK" "$PORT" || status=$?
if [ "$status" = 3 ]; then
    echo "error: port $PORT is in use (a SuperLink left running?): stop that process or set FEDPT_SUPERLINK_PORT" >&2
    exit 2
elif [ "$status" != 0 ]; then
    exit 2
fi
export FLWR_HOME=${FLWR_HOME:-$(mktemp -d)}
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local-sim"

[superlink.local-sim]
address = "127.0.0.1:$PORT"
insecure = true
TOML
flower-superlink --insecure --simulation --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$PORT" > "$FLWR_HOME/superlink.log" 2>&1 &
SUPERLINK=$!
cleanup() {
    # fedpt.deploy.stop_process_tree: the SuperLink's process tree (SuperExec, flwr-simulation, Ray),
    # then SIGTERM/SIGKILL to those PIDs and to the process groups of the ones Flower detached.
    python -c 'import sys; from fedpt.deploy import stop_process_tree; stop_process_tree(int(sys.argv[1]))' \
        "$SUPERLINK" || kill "$SUPERLINK" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 60); do
    grep -q "Uvicorn running" "$FLWR_HOME/superlink.log" 2>/dev/null && break
    kill -0 "$SUPERLINK" 2>/dev/null || { cat "$FLWR_HOME/superlink.log" >&2; exit 1; }
    sleep 0.5
done
sleep 1
flwr run . local-sim --stream --federation-config "num-supernodes=$NODES client-resources-num-cpus=1" \
    --run-config "$RUN_CONFIG"
