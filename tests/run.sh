#!/usr/bin/env bash
# The test command of README.md: every test of the workspace on the embedded
# broker (librdkafka's mock cluster), then the integration suite again on a
# real broker, tansu 0.6.0, which tests/broker.sh installs if missing,
# starts on loopback and stops on exit. Tests of the mock's own behaviour
# (names ending in `_on_mock`) run in the first pass only. At the end it
# lists what did not run: `#[ignore = "reason"]`ed tests, and the mock-only
# tests left out of the real-broker pass. Tests that restart tansu
# (`_on_tansu`, ignored in the other passes) run alone after the tansu
# pass. As root (with iproute2), a third
# pass runs the fleet scenarios on network-namespace hosts (`hosts_*`,
# ignored otherwise); without root it says so in the summary.
#
#   bash tests/run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# `file:line  name: reason` for every #[ignore]d test of the workspace.
ignored_tests() {
    find . -path ./target -prune -o -path ./.git -prune -o -name '*.rs' -print | sort |
        xargs awk '
            FNR == 1 { reason = "" }
            /^[[:space:]]*#\[ignore/ {
                reason = $0
                if (!sub(/^[^"]*"/, "", reason) || !sub(/"\][[:space:]]*$/, "", reason)) reason = "(no reason given)"
                where = FILENAME ":" FNR
                next
            }
            reason != "" && match($0, /fn [A-Za-z0-9_]+/) {
                printf "  %s  %s: %s\n", substr(where, 3), substr($0, RSTART + 3, RLENGTH - 3), reason
                reason = ""
            }'
}

# `file:line  name` for every test of tests/tests that runs in the embedded
# pass only: on the mock (`_on_mock`) or on no broker at all (`_in_memory`).
mock_only_tests() {
    grep -n -E 'fn [A-Za-z0-9_]+_(on_mock|in_memory)\(' tests/tests/*.rs |
        sed -E 's/^([^:]+:[0-9]+):.*fn ([A-Za-z0-9_]+)\(.*/  \1  \2/'
}

# `cargo test ARGS...`, failing unless at least one test whose name
# matches the regex NAME passed (a renamed test must not pass as "0 run").
# Sets `passed_count`.
cargo_test_counted() {
    local name=$1 log
    shift
    log="$(mktemp)"
    if ! cargo test "$@" 2>&1 | tee "$log"; then
        rm -f "$log"
        exit 1
    fi
    passed_count="$(grep -c -E "^test ${name} \.\.\. ok\$" "$log" || true)"
    rm -f "$log"
    if [[ "$passed_count" -eq 0 ]]; then
        echo "no test matching ${name} ran: the filter matched none" >&2
        exit 1
    fi
}

summary() {
    echo
    echo "== tests that restart tansu (_on_tansu): $on_tansu_pass"
    echo "== fleet scenarios on network-namespace hosts (hosts_*): $hosts_pass"
    echo "== skipped tests (ignored, with reasons; the _on_tansu and hosts_ ones ran apart, see above)"
    local ignored
    ignored="$(ignored_tests)"
    if [[ -n "$ignored" ]]; then
        echo "$ignored"
        echo "  (run one with: cargo test -p <crate> --test <file> <name> -- --ignored, after setting what it needs)"
    else
        echo "  none"
    fi
    echo "== skipped in the real-broker pass (mock-only or broker-free; they ran in the embedded pass)"
    mock_only_tests
}

echo "== all tests on the embedded broker (with the ms2m CLI, feature ms2m-kafka/cli)"
env -u MS2M_TEST_BROKERS cargo test --workspace --features ms2m-kafka/cli

echo "== integration tests on tansu (a real Kafka-compatible broker)"
bash tests/broker.sh install
trap 'bash tests/broker.sh stop' EXIT
brokers="$(bash tests/broker.sh start)"
export "${brokers?}"
echo "using $MS2M_TEST_BROKERS"
# The partitioned fleet (4 host processes of 16 tasks) runs apart, below.
partitioned=tasks_spread_fail_over_and_drain_across_host_processes
cargo test -p ms2m-tests -- --skip _on_mock --skip _in_memory --skip "$partitioned"

# On a fresh tansu. Run after the other suites on the same tansu (their
# data in its sqlite store, the fault suite's restarts), it failed 2 of 2
# on 2 cores: renewals were read back late, leases expired and moves
# churned past the test's bounds. On a fresh store it passed 2 of 2.
echo "== the partitioned fleet on tansu, on a fresh store"
bash tests/broker.sh stop
brokers="$(bash tests/broker.sh start)"
export "${brokers?}"
cargo_test_counted "$partitioned" -p ms2m-tests --test partition_processes -- --exact "$partitioned"

echo "== tests that restart tansu and wait for its retention sweep (_on_tansu, ignored otherwise), alone"
cargo_test_counted '[A-Za-z0-9_]+_on_tansu' -p ms2m-tests -- --ignored _on_tansu
on_tansu_pass="RAN and passed ($passed_count test(s))"

echo "== fleet scenarios on network-namespace hosts (root only; each node and tansu on a host of its own)"
if [[ "$(id -u)" -eq 0 ]] && command -v ip >/dev/null; then
    cargo test -p ms2m-tests --test fleet_processes -- --ignored hosts_ --test-threads 1
    hosts_pass="RAN (as root) and passed"
else
    hosts_pass="SKIPPED: needs root and iproute2 (ip netns); they are listed below as ignored"
    echo "$hosts_pass"
fi

summary
