#!/usr/bin/env bash
# Runs Herald on this machine: installs and starts what it needs (nats-server with JetStream, a
# Rust toolchain), builds a release binary and serves with the embedded defaults (SQLite under
# ./data/, email written to ./data/outbox/ as .eml files). Configure with herald.toml or HERALD_*.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_rust
nats_url=${HERALD_NATS__URL:-nats://127.0.0.1:4222}
if [[ $nats_url =~ ^nats://(127\.0\.0\.1|localhost):([0-9]+)$ ]]; then
  ensure_nats "${BASH_REMATCH[2]}" "$PWD/data/nats"
else
  log "using NATS at $nats_url"
fi
log "building herald (release)"
cargo build --release --locked --bin herald
config_args=()
[ -f herald.toml ] && config_args=(--config herald.toml)
exec "${CARGO_TARGET_DIR:-target}/release/herald" "${config_args[@]}" serve
