#!/usr/bin/env bash
# Installs, starts and stops the real broker the integration tests run
# against: tansu 0.6.0 (Kafka-compatible, from crates.io) on loopback with
# sqlite storage.
#
#   tests/broker.sh install   # cargo install tansu 0.6.0 unless it is already there
#   tests/broker.sh start     # start it; prints MS2M_TEST_BROKERS=127.0.0.1:PORT
#   tests/broker.sh stop      # stop it and remove its data
#   tests/broker.sh restart   # kill -9 the process and start it again on the same
#                             # port and sqlite file (fault-injection tests)
#   tests/broker.sh status
#
# State (pid, port, log, sqlite file) lives in $MS2M_BROKER_DIR, default
# <repo>/.tansu. Port: $MS2M_BROKER_PORT, default the first free one from 19092.
# Usage in a shell:  eval "$(tests/broker.sh start)"; cargo test -p ms2m-tests
set -euo pipefail

TANSU_VERSION=0.6.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${MS2M_BROKER_DIR:-$ROOT/.tansu}"

log() { echo "broker.sh: $*" >&2; }

tansu_bin() {
    local candidate
    for candidate in "$(command -v tansu 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; do
        if [[ -n "$candidate" && -x "$candidate" ]] &&
            "$candidate" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install() {
    if bin="$(tansu_bin)"; then
        log "tansu $TANSU_VERSION already installed at $bin"
        return 0
    fi
    log "installing tansu $TANSU_VERSION (cargo install; takes 10-16 minutes on 2 cores)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql >&2
    tansu_bin >/dev/null || { log "tansu $TANSU_VERSION not found after install"; exit 1; }
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Sends a Kafka ApiVersions v0 request and checks that a response comes back.
kafka_answers() {
    local port=$1
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/'"$port"'" || exit 1
        # size=15 | api_key=18 | api_version=0 | correlation_id=1 | client_id="probe"
        printf "\x00\x00\x00\x0f\x00\x12\x00\x00\x00\x00\x00\x01\x00\x05probe" >&3
        head -c 8 <&3 | od -An -tx1 | grep -q "00 00 00 01"
    ' 2>/dev/null
}

is_running() { [[ -f "$DIR/pid" ]] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; }

start() {
    local bin port
    bin="$(tansu_bin)" || { install; bin="$(tansu_bin)"; }
    if is_running; then
        port="$(cat "$DIR/port")"
        log "tansu already running (pid $(cat "$DIR/pid"), port $port)"
        echo "MS2M_TEST_BROKERS=127.0.0.1:$port"
        return 0
    fi
    mkdir -p "$DIR"
    if [[ "${1:-}" != keep ]]; then rm -f "$DIR"/tansu.db*; fi
    port="${2:-${MS2M_BROKER_PORT:-19092}}"
    if [[ -n "${2:-}" ]]; then
        # Restart: the old process released the port; wait until it is free.
        for _ in $(seq 1 50); do port_in_use "$port" || break; sleep 0.1; done
        if port_in_use "$port"; then log "port $port is still in use"; exit 1; fi
    elif [[ -z "${MS2M_BROKER_PORT:-}" ]]; then
        while port_in_use "$port"; do port=$((port + 1)); done
    elif port_in_use "$port"; then
        log "port $port is in use"
        exit 1
    fi
    log "starting tansu $TANSU_VERSION on 127.0.0.1:$port (sqlite://tansu.db in $DIR, log $DIR/tansu.log)"
    # tansu resolves the sqlite URL's path against its working directory.
    (cd "$DIR" && exec nohup "$bin" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "sqlite://tansu.db" \
        >"$DIR/tansu.log" 2>&1 </dev/null) &
    echo $! >"$DIR/pid"
    echo "$port" >"$DIR/port"
    for _ in $(seq 1 150); do
        if ! is_running; then
            log "tansu exited; last lines of its log:"
            tail -20 "$DIR/tansu.log" >&2
            exit 1
        fi
        if kafka_answers "$port"; then
            log "tansu answers ApiVersions on 127.0.0.1:$port"
            echo "MS2M_TEST_BROKERS=127.0.0.1:$port"
            return 0
        fi
        sleep 0.2
    done
    log "tansu did not answer within 30 s; last lines of its log:"
    tail -20 "$DIR/tansu.log" >&2
    stop
    exit 1
}

stop() {
    if is_running; then
        local pid
        pid="$(cat "$DIR/pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped tansu (pid $pid)"
    fi
    rm -f "$DIR/pid" "$DIR/port" "$DIR"/tansu.db*
}

# Kills the process (kill -9) but keeps the sqlite file, then starts it
# again on the same port: a broker crash the clients must ride through.
# Not a graceful stop: while tansu 0.6.0 stops on SIGTERM it answers the
# requests still arriving with UNKNOWN_SERVER_ERROR, which librdkafka takes
# for a permanent failure (a test's own input producer then fails); a
# crash gives clients a transport error, which they retry.
restart() {
    is_running || { log "tansu is not running"; exit 1; }
    local pid port
    pid="$(cat "$DIR/pid")"
    port="$(cat "$DIR/port")"
    kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$DIR/pid"
    log "killed tansu (pid $pid); restarting on port $port with the same sqlite file"
    start keep "$port"
}

status() {
    if is_running; then echo "running pid=$(cat "$DIR/pid") port=$(cat "$DIR/port")"; else echo "stopped"; fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    restart) restart ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|restart|status" >&2; exit 2 ;;
esac
