#!/usr/bin/env bash
# Runs Herald on this machine: installs and starts what it needs (nats-server with JetStream, a
# Rust toolchain), builds a release binary and serves with the embedded defaults (SQLite under
# ./data/, email written to ./data/outbox/ as .eml files). Configure with herald.toml or HERALD_*.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_rust
log "building herald (release)"
cargo build --release --locked --bin herald
herald="${CARGO_TARGET_DIR:-target}/release/herald"
config_args=()
if [ -f herald.toml ]; then
  config_args=(--config herald.toml)
  log "using herald.toml (give other herald commands --config herald.toml too)"
fi
# The NATS URL in force as herald reads it (herald.toml, HERALD_CONFIG, HERALD_NATS__URL, default).
if ! shown=$("$herald" "${config_args[@]}" config 2>/dev/null); then
  "$herald" "${config_args[@]}" config >/dev/null || true # prints why
  die "the configuration cannot be used"
fi
nats_url=$(nats_url_of "$shown")
if port=$(local_nats_port "$nats_url"); then
  ensure_nats "$port" "$PWD/data/nats"
else
  log "using NATS at $nats_url"
fi
exec "$herald" "${config_args[@]}" serve
