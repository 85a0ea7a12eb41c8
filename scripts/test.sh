#!/usr/bin/env bash
# Runs Herald's whole test suite: formatting, lints, unit tests, and the end-to-end suite against
# real nats-server processes, a real SMTP sink, SQLite and PostgreSQL. Installs and starts what
# the tests need (nats-server, PostgreSQL, a Rust toolchain) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_rust
ensure_packages nats-server postgresql chromium chromium-driver
if ! pg_lsclusters -h 2>/dev/null | grep -q online; then
  log "starting PostgreSQL"
  cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  [ -n "$cluster" ] || die "no PostgreSQL cluster found"
  # shellcheck disable=SC2086
  as_root pg_ctlcluster --skip-systemctl-redirect $cluster start
fi
pg_user=${HERALD_TEST_PG_USER:-$(id -un)}
if ! psql -h /var/run/postgresql -U "$pg_user" -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  log "creating PostgreSQL role $pg_user"
  as_root su postgres -c "createuser --superuser '$pg_user'" || true
fi
export HERALD_TEST_PG_USER=$pg_user
if ! command -v schemathesis >/dev/null; then
  log "installing schemathesis (hostile-input tests)"
  command -v pip3 >/dev/null || ensure_packages python3-pip
  # The version the tests' flags and schemathesis.toml were written for. Debian's system Python
  # refuses plain installs (PEP 668).
  pkg=schemathesis==4.32.5
  pip3 install --quiet "$pkg" 2>/dev/null || pip3 install --quiet --user --break-system-packages "$pkg"
  export PATH="$HOME/.local/bin:$PATH"
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo doc (every intra-doc link resolves)"
# Documents the libraries and binaries, as plain `cargo doc` does. Asking for the examples too
# (there are none) makes cargo resolve features with the dev-dependencies, as clippy did above, so
# rustdoc reuses clippy's checked dependencies instead of checking the tree again (61 s → 22 s).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --lib --bins --examples
# The herald binary (the reliability tests run it as a process) and every test target in one
# build: built alone, the binary resolves its dependencies' features without the dev-dependencies
# (criterion, fantoccini), so most of the tree would be compiled a second time for the tests.
log "building the herald binary and the tests"
cargo build --workspace --locked --bins --tests
# The end-to-end tests mostly wait on servers and clocks, so they run with twice as many threads
# as there are cores. On the 2-core machine (2026-12-07): with three threads, each test in a
# process of its own (cargo-nextest), the SQLite suite's tests added up to ~14 min and took
# 4 min 40 s at about one core busy; `cargo test` with six threads took it 3 min 47 s at 1.6
# cores busy, and the PostgreSQL suite 6 min 3 s against 6 min 57 s with three, with the load
# average at 23. Four (not timed on its own) leaves the tests' timing more headroom on a slower
# day than six.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-$(($(nproc) * 2))}
# A hung test must fail the run with a message, not block it until CI's own limit (90 min) ends
# it unexplained. The suites take about 4 (SQLite) and 6-7 min (PostgreSQL) on the 2-core machine;
# 25 min each leaves room for the build within those 90 min.
suite_limit=${HERALD_TEST_SUITE_TIMEOUT:-1500}
# Runs test suite $1 (the command after it) for at most $suite_limit seconds. `timeout` signals
# its whole process group: cargo, the test binaries and the servers they started.
bounded() {
  local what=$1 status=0
  shift
  timeout --kill-after=30 "$suite_limit" "$@" || status=$?
  case $status in
    124 | 137) die "$what did not finish within $suite_limit s (a test hangs?); stopped" ;;
  esac
  return "$status"
}
log "tests (SQLite)"
# `--tests`: every unit and integration test, not the doctests: the crates' docs hold no code
# examples (their blocks are `text`), and rustdoc took ~30 s to find none. Drop the flag when
# a doc example is added.
HERALD_TEST_DB=sqlite bounded "the SQLite test run" cargo test --workspace --locked --tests
log "end-to-end tests (PostgreSQL)"
# Same package set as above, so nothing is rebuilt: every integration test, now on PostgreSQL.
HERALD_TEST_DB=postgres bounded "the PostgreSQL test run" \
  cargo test --locked --workspace --test '*'
log "all tests passed"
