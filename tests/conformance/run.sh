#!/usr/bin/env bash
# containerd's own snapshotter conformance suite (snapshots/testsuite, from
# Debian's containerd 1.6 source package) against an external snapshotter,
# reached over a unix socket through containerd's proxy client. The repository
# carries this runner; nothing outside the clone is read.
#
#   run.sh build                 install Go + containerd sources (apt), build the suite binary
#   run.sh test 'CMD' [NAME] [go-test-args...]
#                                run it; CMD starts one snapshotter serving on
#                                $SNAPSHOTTER_SOCKET with state under $SNAPSHOTTER_ROOT
#   run.sh count LABEL LOG       print "LABEL: N passed, M failed" from a test log;
#                                fails unless M = 0 and N >= 20 (the suite's 20 sub-tests)
#
# Must run as root (the suite mounts the returned mounts). The binary is cached
# in $CONFORMANCE_CACHE (default: target/conformance in this repository) and
# rebuilt when suite_test.go changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CONFORMANCE_CACHE:-$(cd "$here/../.." && pwd)/target/conformance}
bin=$cache/suite.test

build() {
  if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ]; then
    apt-get -o DPkg::Lock::Timeout=600 -qq update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y \
      golang-go golang-github-containerd-containerd-dev >/dev/null
  fi
  mkdir -p "$cache/gopath/src/conformance" "$cache/gocache"
  cp "$here/suite_test.go" "$cache/gopath/src/conformance/"
  (cd "$cache/gopath/src/conformance" &&
    GOPATH="$cache/gopath:/usr/share/gocode" GO111MODULE=off GOCACHE="$cache/gocache" GOFLAGS= \
      go test -c -o "$bin" .)
}

count() {
  local label=$1 log=$2 pass fail
  pass=$(grep -c -- '--- PASS: TestContainerdSnapshotterSuite/' "$log" || true)
  fail=$(grep -c -- '--- FAIL' "$log" || true)
  echo "$label: $pass passed, $fail failed"
  [ "$fail" = 0 ] && [ "$pass" -ge 20 ]
}

case "${1:-}" in
  build) [ -x "$bin" ] && [ "$bin" -nt "$here/suite_test.go" ] || build ;;
  test)
    [ $# -ge 2 ] || { echo "usage: $0 test 'CMD' [NAME] [go-test-args...]" >&2; exit 2; }
    [ -x "$bin" ] && [ "$bin" -nt "$here/suite_test.go" ] || build
    cmd=$2; name=${3:-external}; shift $(( $# >= 3 ? 3 : 2 ))
    SNAPSHOTTER_CMD=$cmd SNAPSHOTTER_NAME=$name exec "$bin" -test.root -test.v "$@"
    ;;
  count) [ $# = 3 ] || { echo "usage: $0 count LABEL LOG" >&2; exit 2; }; count "$2" "$3" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
