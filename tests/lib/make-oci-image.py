#!/usr/bin/env python3
"""Build a small multi-layer OCI image layout tar for Thinbox tests (stdlib only).

Usage: make-oci-image.py OUTPUT.tar [--ref localhost/thinbox-test:3layers]
                         [--busybox /bin/busybox] [--profile test|bench]

Load it with `ctr image import OUTPUT.tar`; the manifest carries the
`org.opencontainers.image.ref.name` annotation, so ctr names the image after
--ref. Output is deterministic (fixed mtimes, sorted entries).

Layers (what tests/host/containerd-e2e.sh checks):
  1 (gzip)  busybox rootfs: /bin/busybox, /bin/<applet> symlinks, empty /proc
            /sys /dev /tmp /root, /etc/passwd, /etc/group, /etc/layer1
  2 (gzip)  /data/keep.txt "layer2-keep", /data/overwrite.txt "layer2",
            /data/remove.txt, /data/opaque/{a,b}, /data/gone/{x,sub/y},
            /data/hardlink (hard link to keep.txt), /data/symlink -> keep.txt,
            /data/owned (uid 1000, gid 1000, mode 0640) "owned"
  3 (plain) /data/overwrite.txt "layer3", /data/.wh.remove.txt (file whiteout),
            /data/opaque/.wh..wh..opq + /data/opaque/c "layer3-c" (opaque dir),
            /data/.wh.gone (whiteout of a directory), /etc/layer3

--profile bench (tests/bench/unpack-start.sh) builds a larger image instead,
four uncompressed layers of about 200 MiB together (file contents are
pseudo-random, seeded, so the output is still deterministic):
  1  the busybox rootfs of layer 1 above plus 20,000 small files (1-4 KiB)
     in /bench/small/dNNN/fNNNNN (200 directories of 100), about 50 MiB
  2  /bench/big/blobNN (30 files of 2 MiB), /bench/opaque/{a,b}, and 2,000 of
     the small files overwritten (every 10th)
  3  whiteouts of 1,980 other small files and of two whole directories
     (/bench/small/d198, d199), /bench/opaque made opaque with one new file,
     /bench/mid/fileNN (60 files of 1 MiB)
  4  /bench/top/fileNN (16 files of 1 MiB), /etc/layer4, and 500 of the
     files layer 2 overwrote, overwritten again
The default (--profile test) output is unchanged by this option's existence.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile

MTIME = 1700000000
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


class Layer:
    """Collects tar entries and renders a deterministic tar stream."""

    def __init__(self):
        self.entries = []

    def _info(self, name, kind, mode, uid=0, gid=0):
        ti = tarfile.TarInfo(name.lstrip("/"))
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        return ti

    def dir(self, name, mode=0o755):
        self.entries.append((self._info(name, tarfile.DIRTYPE, mode), None))

    def file(self, name, data, mode=0o644, uid=0, gid=0):
        if isinstance(data, str):
            data = data.encode()
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        self.entries.append((ti, data))

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.entries.append((ti, None))

    def hardlink(self, name, target):
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target.lstrip("/")
        self.entries.append((ti, None))

    def whiteout(self, path):
        d, base = os.path.split(path.rstrip("/"))
        self.file(os.path.join(d, ".wh." + base), b"", mode=0o600)

    def opaque(self, dirpath):
        self.file(os.path.join(dirpath, ".wh..wh..opq"), b"", mode=0o600)

    def render(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for ti, data in self.entries:
                tar.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def busybox_layer(busybox):
    with open(busybox, "rb") as f:
        binary = f.read()
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    l = Layer()
    for d in ("bin", "dev", "etc", "proc", "root", "sys", "tmp"):
        l.dir(d, 0o1777 if d == "tmp" else 0o755)
    l.file("bin/busybox", binary, mode=0o755)
    # A link named "busybox" would point at itself; skip it.
    for a in sorted(set(applets) - {"busybox"}):
        l.symlink("bin/" + a, "busybox")
    l.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    l.file("etc/group", "root:x:0:\n")
    l.file("etc/layer1", "layer1\n")
    return l


def data_layer():
    l = Layer()
    l.dir("data")
    l.file("data/keep.txt", "layer2-keep\n")
    l.file("data/overwrite.txt", "layer2\n")
    l.file("data/remove.txt", "remove-me\n")
    l.dir("data/opaque")
    l.file("data/opaque/a", "layer2-a\n")
    l.file("data/opaque/b", "layer2-b\n")
    l.dir("data/gone")
    l.file("data/gone/x", "x\n")
    l.dir("data/gone/sub")
    l.file("data/gone/sub/y", "y\n")
    l.hardlink("data/hardlink", "data/keep.txt")
    l.symlink("data/symlink", "keep.txt")
    l.file("data/owned", "owned\n", mode=0o640, uid=1000, gid=1000)
    return l


def change_layer():
    l = Layer()
    l.dir("data")
    l.file("data/overwrite.txt", "layer3\n")
    l.whiteout("data/remove.txt")
    l.dir("data/opaque")
    l.opaque("data/opaque")
    l.file("data/opaque/c", "layer3-c\n")
    l.whiteout("data/gone")
    l.dir("etc")
    l.file("etc/layer3", "layer3\n")
    return l


BENCH_DIRS = 200
BENCH_PER_DIR = 100


def small_path(i):
    return f"bench/small/d{i // BENCH_PER_DIR:03d}/f{i:05d}"


def bench_layers(busybox):
    """The four layers of --profile bench (see the module doc)."""
    rng = random.Random(20261204)
    small = BENCH_DIRS * BENCH_PER_DIR

    l1 = busybox_layer(busybox)
    l1.dir("bench")
    l1.dir("bench/small")
    for d in range(BENCH_DIRS):
        l1.dir(f"bench/small/d{d:03d}")
    for i in range(small):
        l1.file(small_path(i), rng.randbytes(rng.randint(1024, 4096)))

    l2 = Layer()
    l2.dir("bench")
    l2.dir("bench/big")
    for i in range(30):
        l2.file(f"bench/big/blob{i:02d}", rng.randbytes(2 << 20))
    l2.dir("bench/opaque")
    l2.file("bench/opaque/a", "layer2-a\n")
    l2.file("bench/opaque/b", "layer2-b\n")
    for i in range(0, small, 10):
        l2.file(small_path(i), rng.randbytes(2048))

    l3 = Layer()
    l3.dir("bench")
    l3.dir("bench/small")
    removed_dirs = {BENCH_DIRS - 2, BENCH_DIRS - 1}
    for d in sorted(removed_dirs):
        l3.whiteout(f"bench/small/d{d:03d}")
    # Every 10th file (offset 5) outside the removed directories.
    for i in range(5, (BENCH_DIRS - 2) * BENCH_PER_DIR, 10):
        l3.whiteout(small_path(i))
    l3.dir("bench/opaque")
    l3.opaque("bench/opaque")
    l3.file("bench/opaque/c", "layer3-c\n")
    l3.dir("bench/mid")
    for i in range(60):
        l3.file(f"bench/mid/file{i:02d}", rng.randbytes(1 << 20))

    l4 = Layer()
    l4.dir("bench")
    l4.dir("bench/top")
    for i in range(16):
        l4.file(f"bench/top/file{i:02d}", rng.randbytes(1 << 20))
    for i in range(0, 5000, 10):
        l4.file(small_path(i), "layer4\n")
    l4.dir("etc")
    l4.file("etc/layer4", "layer4\n")

    return [(l1, False), (l2, False), (l3, False), (l4, False)]


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--ref", default="localhost/thinbox-test:3layers")
    ap.add_argument("--busybox", default="/bin/busybox")
    ap.add_argument("--profile", choices=("test", "bench"), default="test",
                    help="test: the 3-layer test image (default); bench: the "
                         "4-layer ~200 MiB benchmark image")
    args = ap.parse_args()

    if not os.access(args.busybox, os.X_OK):
        sys.exit(f"make-oci-image: {args.busybox} missing "
                 "(apt-get install -y busybox-static)")

    blobs = {}  # digest -> bytes

    def blob(data):
        d = sha256(data)
        blobs[d] = data
        return d

    layers, diff_ids = [], []
    if args.profile == "bench":
        plan = bench_layers(args.busybox)
    else:
        plan = ((busybox_layer(args.busybox), True),
                (data_layer(), True),
                (change_layer(), False))
    for layer, compress in plan:
        raw = layer.render()
        diff_ids.append(sha256(raw))
        if compress:
            out = io.BytesIO()
            with gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) as gz:
                gz.write(raw)
            data, mt = out.getvalue(), MT_LAYER_GZ
        else:
            data, mt = raw, MT_LAYER_TAR
        layers.append({"mediaType": mt, "digest": blob(data), "size": len(data)})

    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z",
                     "created_by": f"make-oci-image.py layer {i + 1}"}
                    for i in range(len(layers))],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": blob(config_bytes),
                   "size": len(config_bytes)},
        "layers": layers,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": blob(manifest_bytes),
            "size": len(manifest_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": args.ref},
        }],
    }

    out = Layer()
    out.file("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}))
    out.file("index.json", json.dumps(index, sort_keys=True))
    out.dir("blobs")
    out.dir("blobs/sha256")
    for d in sorted(blobs):
        out.file("blobs/sha256/" + d.split(":", 1)[1], blobs[d])
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out.render())
    os.replace(tmp, args.output)
    print(args.ref)


if __name__ == "__main__":
    main()
