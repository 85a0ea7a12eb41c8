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
[ -f herald.toml ] && config_args=(--config herald.toml)
# The NATS URL in force as herald reads it (herald.toml, HERALD_CONFIG, HERALD_NATS__URL, default).
if ! shown=$("$herald" "${config_args[@]}" config 2>/dev/null); then
  "$herald" "${config_args[@]}" config >/dev/null || true # prints why
  die "the configuration cannot be used"
fi
nats_url=$(awk '/^\[/ { section = $0 } section == "[nats]" && $1 == "url" && !found { gsub(/"/, "", $3); print $3; found = 1 }' <<<"$shown")
if [[ $nats_url =~ ^nats://(127\.0\.0\.1|localhost):([0-9]+)$ ]]; then
  ensure_nats "${BASH_REMATCH[2]}" "$PWD/data/nats"
else
  log "using NATS at $nats_url"
fi
exec "$herald" "${config_args[@]}" serve
