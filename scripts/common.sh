# Shared helpers of Herald's scripts (sourced, not run).

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "run as root (needed: $*)"; fi
}

apt_updated=""
# Installs Debian packages that are missing.
ensure_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
  if [ -z "$apt_updated" ]; then log "apt-get update"; as_root apt-get update -qq; apt_updated=1; fi
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Makes sure a Rust toolchain (edition 2024: Rust >= 1.85) is on PATH, installing rustup if not.
ensure_rust() {
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  if ! command -v cargo >/dev/null; then
    ensure_packages curl ca-certificates build-essential
    log "installing Rust with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >/dev/null
    . "$HOME/.cargo/env"
  fi
  command -v cc >/dev/null || ensure_packages build-essential
}

# Whether something accepts TCP connections on host:port.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Waits up to $3 seconds for host:port.
wait_port() {
  local i
  for ((i = 0; i < $3 * 10; i++)); do port_open "$1" "$2" && return 0; sleep 0.1; done
  return 1
}

# Starts nats-server with JetStream on 127.0.0.1:$1 with its store under $2, unless one answers.
ensure_nats() {
  local port=$1 store=$2
  ensure_packages nats-server
  if port_open 127.0.0.1 "$port"; then
    log "NATS already listening on 127.0.0.1:$port"
    return 0
  fi
  mkdir -p "$store"
  log "starting nats-server -js on 127.0.0.1:$port (store: $store)"
  nohup nats-server -a 127.0.0.1 -p "$port" -js -sd "$store" >"$store/nats-server.log" 2>&1 &
  wait_port 127.0.0.1 "$port" 15 || die "nats-server did not start; see $store/nats-server.log"
}
