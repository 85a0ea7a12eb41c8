# Shared helpers of Herald's scripts (sourced, not run).

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "run as root (needed: $*)"; fi
}

apt_updated=""
installed_now=()
# Installs Debian packages that are missing (listed in installed_now afterwards).
ensure_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  installed_now+=("${missing[@]}")
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
  if [ -z "$apt_updated" ]; then log "apt-get update"; as_root apt-get update -qq; apt_updated=1; fi
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The oldest Rust the workspace builds with (Cargo.toml's rust-version).
RUST_MIN_MINOR=94

# Makes sure a Rust toolchain of at least 1.$RUST_MIN_MINOR with rustfmt and clippy is on PATH,
# installing rustup if there is none (or updating rustup's when it is older).
ensure_rust() {
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  if ! command -v cargo >/dev/null; then
    ensure_packages curl ca-certificates build-essential
    log "installing Rust with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >/dev/null
    . "$HOME/.cargo/env"
  fi
  local minor
  minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
  if [ "${minor:-0}" -lt "$RUST_MIN_MINOR" ]; then
    command -v rustup >/dev/null \
      || die "$(rustc --version) is older than 1.$RUST_MIN_MINOR; install a newer Rust (rustup)"
    log "updating Rust (found $(rustc --version))"
    rustup update stable >/dev/null && rustup default stable >/dev/null
  fi
  if command -v rustup >/dev/null; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
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

# Whether the NATS server on 127.0.0.1:$1 has JetStream (its INFO line says so).
jetstream_on() {
  local info=""
  { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
  read -r -t 5 info <&3 || true
  exec 3>&-
  [[ $info == *'"jetstream":true'* ]]
}

# The `url` of the `[nats]` section of `herald config`'s output ($1).
nats_url_of() {
  awk '/^\[/ { section = $0 } section == "[nats]" && $1 == "url" && !found { gsub(/"/, "", $3); print $3; found = 1 }' <<<"$1"
}

# The port of NATS URL $1 when it names this machine (nats://127.0.0.1:PORT or
# nats://localhost:PORT, with or without a login, which `herald config` shows as `***@`); fails for
# any other.
local_nats_port() {
  [[ $1 =~ ^nats://([^@/]*@)?(127\.0\.0\.1|localhost):([0-9]+)$ ]] || return 1
  printf '%s\n' "${BASH_REMATCH[3]}"
}

# Starts nats-server with JetStream on 127.0.0.1:$1 with its store under $2, unless one with
# JetStream answers there.
ensure_nats() {
  local port=$1 store=$2
  ensure_packages nats-server
  if port_open 127.0.0.1 "$port" && ! jetstream_on "$port"; then
    # Debian's package starts its own service (no JetStream, port 4222) where systemd runs.
    if [[ " ${installed_now[*]} " == *" nats-server "* ]] \
      && systemctl is-active --quiet nats-server 2>/dev/null; then
      log "stopping the nats-server service the package started (it runs without JetStream)"
      as_root systemctl disable --now nats-server >/dev/null 2>&1
      local i
      for ((i = 0; i < 50; i++)); do port_open 127.0.0.1 "$port" || break; sleep 0.1; done
    else
      die "a NATS server without JetStream listens on 127.0.0.1:$port; give it JetStream, stop it \
(systemctl disable --now nats-server) or point HERALD_NATS__URL at one with JetStream"
    fi
  fi
  if port_open 127.0.0.1 "$port"; then
    log "NATS with JetStream already listening on 127.0.0.1:$port"
    return 0
  fi
  mkdir -p "$store"
  log "starting nats-server -js on 127.0.0.1:$port (store: $store)"
  nohup nats-server -a 127.0.0.1 -p "$port" -js -sd "$store" >"$store/nats-server.log" 2>&1 &
  wait_port 127.0.0.1 "$port" 15 || die "nats-server did not start; see $store/nats-server.log"
}
