#!/usr/bin/env python3
"""Build a small multi-layer OCI image layout tar for Thinbox tests (stdlib only).

Usage: make-oci-image.py OUTPUT.tar [--ref localhost/thinbox-test:3layers]
                         [--busybox /bin/busybox]

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
"""

import argparse
import gzip
import hashlib
import io
import json
import os
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


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--ref", default="localhost/thinbox-test:3layers")
    ap.add_argument("--busybox", default="/bin/busybox")
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
    for layer, compress in ((busybox_layer(args.busybox), True),
                            (data_layer(), True),
                            (change_layer(), False)):
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
