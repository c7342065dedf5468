#!/usr/bin/env bash
# Sets up and runs thinbox-snapshotter on the embedded default pool (a sparse XFS
# image under the state root), after printing the containerd config that uses it.
#   THINBOX_ROOT    state directory   (default /var/lib/thinbox)
#   THINBOX_SOCKET  socket to serve   (default /run/thinbox/snapshotter.sock)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the snapshotter attaches loop devices and mounts its pool" >&2; exit 1; }
root=${THINBOX_ROOT:-/var/lib/thinbox}
socket=${THINBOX_SOCKET:-/run/thinbox/snapshotter.sock}
bash scripts/install-deps.sh
cargo build --release -p thinbox-snapshotter
cat <<CONF
# Add to /etc/containerd/config.toml, restart containerd, then e.g.
#   ctr image pull --snapshotter thinbox docker.io/library/alpine:latest
[proxy_plugins]
  [proxy_plugins.thinbox]
    type = "snapshot"
    address = "$socket"
CONF
exec target/release/thinbox-snapshotter --root "$root" --address "$socket"
