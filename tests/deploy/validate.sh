#!/usr/bin/env bash
# Validates everything under deploy/: Kubernetes manifests and examples against
# the Kubernetes OpenAPI schemas (strict) of the versions below, the snapshot
# CRD kinds against schemas transcribed from external-snapshotter's CRDs, the
# Kata and containerd TOML files (containerd's own `config dump`), and the
# systemd unit (`systemd-analyze verify`). See tests/deploy/validate.py for
# the full list of checks.
#
#   bash tests/deploy/validate.sh
#
# Prints one line per file and `deploy: N valid, M invalid`; exits 1 if any
# file is invalid. Needs network access to PyPI the first time (a private
# venv under target/ with the pinned packages of requirements.txt) and, as
# root, installs missing Debian packages (python3-venv, containerd, systemd).
# Nothing is skipped: a check that cannot run fails the script.
#
#   THINBOX_K8S_VERSIONS  Kubernetes versions to validate against
#                         (default 1.31,1.37: the oldest supported, the newest known)
set -euo pipefail
cd "$(dirname "$0")/../.."
here=$PWD
versions=${THINBOX_K8S_VERSIONS:-1.31,1.37}
venv=$here/target/deploy-venv
reqs=$here/tests/deploy/requirements.txt

die() { echo "validate.sh: $*" >&2; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] || die "missing $* (run as root to install, or install it yourself)"
  echo "installing: $*"
  apt-get -o DPkg::Lock::Timeout=600 -qq update
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "$@" >/dev/null
}

command -v python3 >/dev/null || apt_install python3
command -v containerd >/dev/null || apt_install containerd
command -v systemd-analyze >/dev/null || apt_install systemd
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 >= 3.11 needed (tomllib)"

# The venv is rebuilt whenever requirements.txt changes.
stamp=$venv/.requirements.sha256
want=$(sha256sum "$reqs" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv" || die "python3 -m venv $venv failed"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$reqs" \
    || die "pip could not install tests/deploy/requirements.txt (PyPI reachable?)"
  echo "$want" > "$stamp"
fi

exec "$venv/bin/python" tests/deploy/validate.py \
  --repo "$here" \
  --kubernetes-versions "$versions" \
  --containerd "$(command -v containerd)" \
  --scratch "$here/target/deploy-validate"
