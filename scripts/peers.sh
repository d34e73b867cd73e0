#!/usr/bin/env bash
# The peers of scenario 6 of `make bench` (bench/peers.py), installed from package registries
# under .services/peers/ (git-ignored), idempotent:
#
#   pgstream  Go module proxy: github.com/xataio/pgstream@$PGSTREAM_VERSION, built with go build
#             → .services/peers/bin/pgstream
#   pgsync    PyPI: pgsync==$PGSYNC_VERSION in its own venv → .services/peers/pgsync-venv/bin/pgsync
#
#   scripts/peers.sh [install] [pgstream] [pgsync]   install the named peers (default: both)
#   scripts/peers.sh status                          one line per peer
#
# A peer that fails to install makes the script exit non-zero with a message on stderr; the bench
# then reports that peer's row as FAILED with the message and goes on.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PGDERIVE_PEERS_DIR:-$ROOT/.services/peers}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
PYTHON=${PYTHON:-python3}
PGSTREAM_VERSION=${PGSTREAM_VERSION:-v1.3.1}
PGSYNC_VERSION=${PGSYNC_VERSION:-7.3.0}

log() { printf '[peers] %s\n' "$*" >&2; }
die() { printf '[peers] error: %s\n' "$*" >&2; exit 1; }

pgstream_ok() { [ -x "$PEERS/bin/pgstream" ] && [ "$(cat "$PEERS/bin/pgstream.version" 2>/dev/null)" = "$PGSTREAM_VERSION" ]; }
pgsync_ok() { "$PEERS/pgsync-venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pgsync') != '$PGSYNC_VERSION')" 2>/dev/null; }

install_pgstream() {
  pgstream_ok && { log "pgstream $PGSTREAM_VERSION: already installed"; return 0; }
  [ -x "$GO" ] || die "pgstream: no Go toolchain (set GO=/path/to/go)"
  local scratch=$PEERS/src/gomod src=$PEERS/src/pgstream-$PGSTREAM_VERSION dir
  mkdir -p "$scratch" "$PEERS/bin"
  # `go install …@version` asks the proxy for the version list, which this machine's proxy may
  # refuse: download exactly this version's module in a scratch module and build it there.
  [ -f "$scratch/go.mod" ] || (cd "$scratch" && "$GO" mod init pgderive-peers-scratch >/dev/null 2>&1)
  log "pgstream: go mod download github.com/xataio/pgstream@$PGSTREAM_VERSION"
  dir=$(cd "$scratch" && "$GO" mod download -json "github.com/xataio/pgstream@$PGSTREAM_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] && [ -d "$dir" ] || die "pgstream: go mod download gave no module directory"
  rm -rf "$src"
  cp -r "$dir" "$src"
  chmod -R u+w "$src"
  log "pgstream: go build (a few minutes on 2 cores)"
  (cd "$src" && GOFLAGS=-mod=mod "$GO" build -o "$PEERS/bin/pgstream.part" .) || die "pgstream: go build failed"
  mv "$PEERS/bin/pgstream.part" "$PEERS/bin/pgstream"
  echo "$PGSTREAM_VERSION" >"$PEERS/bin/pgstream.version"
  log "pgstream $PGSTREAM_VERSION: $PEERS/bin/pgstream"
}

install_pgsync() {
  pgsync_ok && { log "pgsync $PGSYNC_VERSION: already installed"; return 0; }
  log "pgsync: pip install pgsync==$PGSYNC_VERSION into $PEERS/pgsync-venv"
  [ -x "$PEERS/pgsync-venv/bin/python" ] || "$PYTHON" -m venv "$PEERS/pgsync-venv"
  "$PEERS/pgsync-venv/bin/pip" install -q --disable-pip-version-check "pgsync==$PGSYNC_VERSION" \
    || die "pgsync: pip install failed"
  pgsync_ok || die "pgsync: installed, but importlib.metadata does not report $PGSYNC_VERSION"
  log "pgsync $PGSYNC_VERSION: $PEERS/pgsync-venv/bin/pgsync"
}

status() {
  if pgstream_ok; then echo "pgstream  $PGSTREAM_VERSION  $PEERS/bin/pgstream"; else echo "pgstream  missing"; fi
  if pgsync_ok; then echo "pgsync    $PGSYNC_VERSION    $PEERS/pgsync-venv/bin/pgsync"; else echo "pgsync    missing"; fi
}

cmd=install
case "${1:-}" in install|status) cmd=$1; shift ;; esac
mkdir -p "$PEERS"
if [ "$cmd" = status ]; then status; exit 0; fi
[ $# -gt 0 ] || set -- pgstream pgsync
rc=0
for peer in "$@"; do
  case "$peer" in
    pgstream) (install_pgstream) || rc=1 ;;
    pgsync) (install_pgsync) || rc=1 ;;
    *) log "unknown peer: $peer (pgstream, pgsync)"; rc=1 ;;
  esac
done
exit $rc
