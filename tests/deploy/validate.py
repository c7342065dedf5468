#!/usr/bin/env python3
"""Validates Thinbox's deployment files under deploy/ (run by validate.sh in its venv).

What is checked, per file:
  deploy/kubernetes/*.yaml, deploy/examples/*.yaml
    * YAML: every document parses, no duplicate keys.
    * Built-in kinds: the Kubernetes OpenAPI schema of each requested version,
      strict (unknown fields are errors), via the kubernetes-validate package.
      A kind without a schema is an error, not a warning.
    * snapshot.storage.k8s.io/v1 VolumeSnapshotClass and VolumeSnapshot, and
      groupsnapshot.storage.k8s.io/v1beta2 VolumeGroupSnapshotClass (CRDs,
      not in those schemas): our own JSON schemas below, transcribed from the
      openAPIV3Schema of external-snapshotter v8.6.0's CRDs (required fields,
      types, enums, no unknown fields, exactly one snapshot source).
    * Kustomization: every listed resource exists, every manifest next to it
      is listed, every `images` entry names an image used by a container.
    * Rules the API server enforces that the schemas do not express, and
      consistency with the driver's contract (csi.thinbox.io, parameters,
      socket paths, references between objects); see lint_*(). The node
      DaemonSet runs only the upstream sidecars (thinboxd is on the host):
      no other image, nothing privileged, no host path but the CSI socket's
      directory and kubelet's plugin registry, each sidecar's required flags.
  deploy/host/*.toml
    * Parses (tomllib). Kata fragment: the [hypervisor.qemu] keys and values.
    * containerd snippet: the expected tables, and `containerd config dump`
      of the snippet keeps every key with its value (containerd drops keys it
      does not know without a word).
    * thinboxd's config (thinboxd.toml, installed as /etc/thinbox/config.toml):
      only thinboxd's top-level keys and sections, devices kept on exit, and
      the sockets (set or default) the containerd snippet and the DaemonSet use.
  deploy/systemd/*.service
    * `systemd-analyze verify` against a scratch root holding the unit, the
      system's unit files and stubs for the ExecStart binaries; any output
      (unknown keys, bad values) is a failure, not only the exit code.
    * The directives the deployment relies on: thinboxd with the installed
      config, ordered before (and wanted by) containerd and kubelet, no
      release on exit, no mount namespace or device restrictions.

Prints one line per file (and the reasons under an invalid one), then
`deploy: N valid, M invalid`; exits 1 if anything is invalid.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kv

DRIVER = "csi.thinbox.io"
NAMESPACE = "thinbox-system"
# thinboxd's defaults (crates/snapshotter/src/config.rs, crates/csi-driver/src/config.rs).
SOCKET = "/run/thinbox/snapshotter.sock"
CSI_DIR = f"/var/lib/kubelet/plugins/{DRIVER}"
CSI_ENDPOINT = f"unix://{CSI_DIR}/csi.sock"
THINBOXD = "/usr/bin/thinboxd"
CONFIG = "/etc/thinbox/config.toml"
# thinboxd's configuration: top-level keys and sections (crates/thinboxd/src/config.rs).
CONFIG_KEYS = {"release_on_exit", "metrics_address", "pool", "snapshot", "csi"}
# The node DaemonSet: upstream sidecars only, each with the flags the
# deployment relies on (name: (image, required args)).
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"
SIDECARS = {
    "node-driver-registrar": ("csi-node-driver-registrar", [f"--kubelet-registration-path={CSI_DIR}/csi.sock"]),
    "livenessprobe": ("livenessprobe", []),
    "csi-provisioner": ("csi-provisioner", ["--node-deployment", "--enable-capacity", "--capacity-ownerref-level=1",
                                            "--node-deployment-immediate-binding=false", "--strict-topology"]),
    "csi-resizer": ("csi-resizer", ["--leader-election"]),
    "csi-snapshotter": ("csi-snapshotter", ["--node-deployment"]),
}
# Host paths the sidecar pod may mount: the socket's directory and kubelet's plugin registry.
SIDECAR_HOST_PATHS = {CSI_DIR, "/var/lib/kubelet/plugins_registry"}
# Unit options that give the service its own mount namespace (the pool mount,
# containerd's device mounts and kubelet's volume mounts must be the host's)
# or restrict device access (loop and device-mapper nodes).
UNIT_NAMESPACING = ("PrivateTmp", "ProtectSystem", "ProtectHome", "ReadWritePaths", "ReadOnlyPaths",
                    "InaccessiblePaths", "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules",
                    "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                    "ProtectProc", "ProcSubset", "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem",
                    "MountFlags", "RootDirectory", "RootImage")
UNIT_DEVICES = ("PrivateDevices", "DevicePolicy", "DeviceAllow")

# --- YAML with duplicate-key detection ------------------------------------------


class StrictLoader(yaml.SafeLoader):
    pass


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]


# --- snapshot.storage.k8s.io/v1 (external-snapshotter v8.6.0 CRDs) ------------

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _NAME,
        "namespace": _NAME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def _class_schema(api_version, kind):
    """A VolumeSnapshotClass or VolumeGroupSnapshotClass: the two CRDs share their fields."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "driver": {"type": "string", "minLength": 1},
            "deletionPolicy": {"enum": ["Delete", "Retain"]},
            "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "additionalProperties": False,
    }


SNAPSHOT_SCHEMAS = {
    "VolumeSnapshotClass": _class_schema("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"),
    # groupsnapshot.storage.k8s.io/v1beta2, from the same release's CRD.
    "VolumeGroupSnapshotClass": _class_schema("groupsnapshot.storage.k8s.io/v1beta2", "VolumeGroupSnapshotClass"),
    "VolumeSnapshot": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
            "kind": {"const": "VolumeSnapshot"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "source": {
                        "type": "object",
                        "properties": {
                            "persistentVolumeClaimName": {"type": "string", "minLength": 1},
                            "volumeSnapshotContentName": {"type": "string", "minLength": 1},
                        },
                        "additionalProperties": False,
                        # "exactly one of volumeSnapshotContentName and
                        # persistentVolumeClaimName must be set"
                        "oneOf": [
                            {"required": ["persistentVolumeClaimName"]},
                            {"required": ["volumeSnapshotContentName"]},
                        ],
                    },
                    "volumeSnapshotClassName": {"type": "string", "minLength": 1},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}

# Cluster-scoped kinds; everything else in deploy/kubernetes must name its namespace.
CLUSTER_KINDS = {"Namespace", "CSIDriver", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                 "RuntimeClass", "VolumeSnapshotClass", "VolumeGroupSnapshotClass", "PersistentVolume",
                 "PriorityClass"}

SC_PARAMS = {"kind": {"block", "file", "dir"},
             "csi.storage.k8s.io/fstype": {"ext4", "xfs"},
             "thinbox.io/sandbox": {"kata", "runc"},
             "thinbox.io/encryption": {"ephemeral"}}
INLINE_ATTRS = {"size", "fsType", "thinbox.io/sandbox", "thinbox.io/encryption"}
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z]$")
CSIDRIVER_SPEC = {
    "attachRequired": False, "podInfoOnMount": True,
    "volumeLifecycleModes": ["Persistent", "Ephemeral"], "fsGroupPolicy": "File",
    "storageCapacity": True, "requiresRepublish": False,
}


def name_of(doc):
    return (doc.get("metadata") or {}).get("name", "?")


def key(doc):
    return f"{doc.get('kind', '?')}/{name_of(doc)}"


def pod_spec(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec") or {}
    if kind in ("DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"):
        return ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return None


# --- lint: per document ----------------------------------------------------------


def lint_pod_spec(doc, spec, index):
    errs = []
    where = key(doc)
    containers = list(spec.get("initContainers") or []) + list(spec.get("containers") or [])
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    if len(volumes) != len(spec.get("volumes") or []):
        errs.append(f"{where}: duplicate volume names")
    names, ports = set(), set()
    for c in containers:
        cn = c.get("name")
        if cn in names:
            errs.append(f"{where}: duplicate container {cn}")
        names.add(cn)
        image = c.get("image", "")
        tag = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
            errs.append(f"{where}/{cn}: image {image!r} is not pinned to a version")
        env = {e["name"] for e in c.get("env") or []}
        for arg in list(c.get("command") or []) + list(c.get("args") or []):
            # $(VAR) is expanded from the container's env; an unknown one stays
            # as written. Upper-case names are meant as env references (a
            # lower-case $(cmd) in a shell script is command substitution).
            for var in re.findall(r"(?<!\$)\$\(([A-Z_][A-Z0-9_]*)\)", str(arg)):
                if var not in env:
                    errs.append(f"{where}/{cn}: $({var}) in {arg!r} is not in the container's env "
                                "(kubelet would pass it literally)")
        for p in c.get("ports") or []:
            pn = p.get("name")
            if pn is None:
                continue
            if len(pn) > 15 or not PORT_NAME.match(pn):
                errs.append(f"{where}/{cn}: port name {pn!r} is not an IANA service name (<= 15 chars)")
            if pn in ports:
                errs.append(f"{where}: port name {pn!r} used twice in the pod")
            ports.add(pn)
            if "hostPort" in p:
                errs.append(f"{where}/{cn}: hostPort {p['hostPort']} (the plugin needs no host ports)")
        privileged = bool((c.get("securityContext") or {}).get("privileged"))
        for m in c.get("volumeMounts") or []:
            vol = volumes.get(m.get("name"))
            if vol is None:
                errs.append(f"{where}/{cn}: volumeMount {m.get('name')!r} has no volume")
                continue
            if m.get("mountPropagation") == "Bidirectional":
                if not privileged:
                    errs.append(f"{where}/{cn}: Bidirectional propagation needs a privileged container")
                hp = (vol.get("hostPath") or {}).get("path")
                if hp is None:
                    errs.append(f"{where}/{cn}: Bidirectional mount of a non-hostPath volume")
                elif hp.rstrip("/") != m["mountPath"].rstrip("/"):
                    errs.append(f"{where}/{cn}: Bidirectional mount {m['mountPath']} != host path {hp} "
                                "(kubelet passes host paths to the driver)")
    for v in volumes.values():
        csi = v.get("csi")
        if csi and csi.get("driver") == DRIVER:
            attrs = csi.get("volumeAttributes") or {}
            for k in set(attrs) - INLINE_ATTRS:
                errs.append(f"{where}: inline volume {v['name']}: unknown attribute {k!r}")
            if "size" in attrs and not QUANTITY.match(str(attrs["size"])):
                errs.append(f"{where}: inline volume {v['name']}: size {attrs['size']!r} is not a quantity")
            if attrs.get("fsType", "ext4") not in SC_PARAMS["csi.storage.k8s.io/fstype"]:
                errs.append(f"{where}: inline volume {v['name']}: fsType {attrs['fsType']!r}")
            sandbox = attrs.get("thinbox.io/sandbox", "runc")
            if sandbox not in SC_PARAMS["thinbox.io/sandbox"]:
                errs.append(f"{where}: inline volume {v['name']}: sandbox {sandbox!r}")
            if "thinbox.io/encryption" in attrs:
                if attrs["thinbox.io/encryption"] not in SC_PARAMS["thinbox.io/encryption"]:
                    errs.append(f"{where}: inline volume {v['name']}: encryption "
                                f"{attrs['thinbox.io/encryption']!r}")
                if sandbox != "kata":
                    errs.append(f"{where}: inline volume {v['name']}: encryption needs "
                                "thinbox.io/sandbox: kata (the guest holds the key)")
            if sandbox == "kata" and spec.get("runtimeClassName") != "kata":
                errs.append(f"{where}: kata inline volume in a pod without runtimeClassName: kata")
    if doc.get("kind") == "Pod":
        index["uses"].append(("RuntimeClass", spec.get("runtimeClassName"), where))
        for v in volumes.values():
            pvc = v.get("persistentVolumeClaim")
            if pvc:
                index["uses"].append(("PersistentVolumeClaim", pvc.get("claimName"), where))
    sa = spec.get("serviceAccountName")
    if sa:
        index["uses"].append(("ServiceAccount", sa, where))
    return errs


def lint_node_plugin(doc, index):
    """The sidecar DaemonSet against the driver's contract: thinboxd serves the
    CSI socket on the host; the pod holds only upstream sidecars reaching it."""
    errs = []
    where = key(doc)
    spec = pod_spec(doc)
    cs = {c["name"]: c for c in spec.get("containers") or []}
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    for name, c in cs.items():
        if name not in SIDECARS:
            errs.append(f"{where}/{name}: not one of the upstream sidecars {sorted(SIDECARS)} "
                        "(thinboxd runs on the host, not in the pod)")
            continue
        image = c.get("image", "")
        if image.rsplit(":", 1)[0] != SIDECAR_REGISTRY + SIDECARS[name][0]:
            errs.append(f"{where}/{name}: image {image!r} is not {SIDECAR_REGISTRY}{SIDECARS[name][0]}")
        sc = c.get("securityContext") or {}
        if sc.get("privileged") or sc.get("allowPrivilegeEscalation", True) is not False:
            errs.append(f"{where}/{name}: privileged or allowPrivilegeEscalation not false (a sidecar needs neither)")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            errs.append(f"{where}/{name}: capabilities not dropped (drop: [ALL])")
        args = c.get("args") or []
        if "--csi-address=/csi/csi.sock" not in args:
            errs.append(f"{where}/{name}: missing --csi-address=/csi/csi.sock")
        for want in SIDECARS[name][1]:
            if want not in args:
                errs.append(f"{where}/{name}: missing {want}")
        mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
        plugin = mounts.get("/csi")
        if plugin is None:
            errs.append(f"{where}/{name}: the CSI socket's directory is not mounted at /csi")
        else:
            hp = (vols.get(plugin) or {}).get("hostPath") or {}
            if hp.get("path", "").rstrip("/") != CSI_DIR or hp.get("type") not in ("Directory", "DirectoryOrCreate"):
                errs.append(f"{where}/{name}: /csi is not the host directory {CSI_DIR} (type Directory or "
                            f"DirectoryOrCreate; a socket file mount would keep a restarted thinboxd's old socket)")
        for m in c.get("volumeMounts") or []:
            if m.get("mountPropagation") not in (None, "None"):
                errs.append(f"{where}/{name}: mountPropagation {m['mountPropagation']} (the sidecars mount nothing)")
        if ("--node-deployment" in args) != (name in ("csi-provisioner", "csi-snapshotter")):
            errs.append(f"{where}/{name}: --node-deployment belongs to the provisioner and the snapshotter only")
        if name == "csi-snapshotter" and "--feature-gates=CSIVolumeGroupSnapshot=true" not in args:
            errs.append(f"{where}/{name}: --feature-gates=CSIVolumeGroupSnapshot=true missing "
                        "(the driver serves GroupController)")
        if "--node-deployment" in args:
            if any(a.startswith("--leader-election") and a != "--leader-election=false" for a in args):
                errs.append(f"{where}/{name}: leader election with --node-deployment")
            if "NODE_NAME" not in {e["name"] for e in c.get("env") or []}:
                errs.append(f"{where}/{name}: NODE_NAME env missing")
    for name in SIDECARS:
        if name not in cs:
            errs.append(f"{where}: no {name} container")
    for init in spec.get("initContainers") or []:
        errs.append(f"{where}/{init.get('name')}: init container (the pod holds the sidecars only)")
    for v in vols.values():
        hp = (v.get("hostPath") or {}).get("path")
        if hp is not None and hp.rstrip("/") not in SIDECAR_HOST_PATHS:
            errs.append(f"{where}: host path {hp} (the sidecars need only {sorted(SIDECAR_HOST_PATHS)})")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        errs.append(f"{where}: host network, PID or IPC namespace (the sidecars need none)")
    # The socket kubelet is told about must be the one thinboxd serves.
    reg = cs.get("node-driver-registrar") or {}
    regpath = [a.split("=", 1)[1] for a in reg.get("args") or [] if a.startswith("--kubelet-registration-path=")]
    index["registration_path"] = regpath[0] if regpath else None
    if regpath and regpath[0] != f"{CSI_DIR}/csi.sock":
        errs.append(f"{where}: kubelet registration path {regpath[0]} is not thinboxd's CSI socket {CSI_DIR}/csi.sock")
    if "/registration" not in {m.get("mountPath") for m in reg.get("volumeMounts") or []}:
        errs.append(f"{where}/node-driver-registrar: kubelet's plugin registry is not mounted at /registration")
    prov = cs.get("csi-provisioner") or {}
    env = {e["name"] for e in prov.get("env") or []}
    if not {"NAMESPACE", "POD_NAME"} <= env:
        errs.append(f"{where}/csi-provisioner: --enable-capacity needs NAMESPACE and POD_NAME env")
    # thinboxd's health: the livenessprobe sidecar's /healthz, used as the pod's readiness.
    probe = cs.get("livenessprobe") or {}
    endpoint = [a.split(":")[-1] for a in probe.get("args") or [] if a.startswith("--http-endpoint=")]
    ports = {p.get("name"): p.get("containerPort") for p in probe.get("ports") or []}
    ready = ((probe.get("readinessProbe") or {}).get("httpGet") or {})
    port = ports.get(ready.get("port"), ready.get("port"))
    if not endpoint or ready.get("path") != "/healthz" or str(port) != endpoint[0]:
        errs.append(f"{where}/livenessprobe: no readinessProbe on its own /healthz (--http-endpoint)")
    sel = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    labels = (((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not sel or any(labels.get(k) != v for k, v in sel.items()):
        errs.append(f"{where}: selector does not match the template's labels")
    return errs


def lint_doc(doc, rel, index):
    errs = []
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    if rel.startswith("deploy/kubernetes/") and kind not in CLUSTER_KINDS and meta.get("namespace") != NAMESPACE:
        errs.append(f"{key(doc)}: namespaced object outside {NAMESPACE}")
    spec = pod_spec(doc)
    if spec is not None:
        errs += lint_pod_spec(doc, spec, index)
    if kind == "DaemonSet" and name_of(doc) == "thinbox-csi-node":
        errs += lint_node_plugin(doc, index)
    if kind == "CSIDriver":
        if name_of(doc) != DRIVER:
            errs.append(f"{key(doc)}: name is not {DRIVER}")
        if doc.get("spec") != CSIDRIVER_SPEC:
            errs.append(f"{key(doc)}: spec {doc.get('spec')} != contract {CSIDRIVER_SPEC}")
    if kind == "StorageClass" and doc.get("provisioner") == DRIVER:
        params = doc.get("parameters") or {}
        for k, v in params.items():
            if k not in SC_PARAMS:
                errs.append(f"{key(doc)}: unknown parameter {k!r}")
            elif v not in SC_PARAMS[k]:
                errs.append(f"{key(doc)}: parameter {k}={v!r} not in {sorted(SC_PARAMS[k])}")
        if doc.get("volumeBindingMode") != "WaitForFirstConsumer":
            errs.append(f"{key(doc)}: node-local volumes need volumeBindingMode WaitForFirstConsumer")
        if doc.get("allowVolumeExpansion") is not True or doc.get("reclaimPolicy", "Delete") != "Delete":
            errs.append(f"{key(doc)}: contract: allowVolumeExpansion true, reclaimPolicy Delete")
    if kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass") and doc.get("driver") != DRIVER:
        errs.append(f"{key(doc)}: driver is not {DRIVER}")
    if kind == "PersistentVolumeClaim":
        spec = doc.get("spec") or {}
        index["uses"].append(("StorageClass", spec.get("storageClassName"), key(doc)))
        ds = spec.get("dataSource") or {}
        if ds:
            index["uses"].append((ds.get("kind"), ds.get("name"), key(doc)))
    if kind == "VolumeSnapshot":
        spec = doc.get("spec") or {}
        index["uses"].append(("VolumeSnapshotClass", spec.get("volumeSnapshotClassName"), key(doc)))
        index["uses"].append(("PersistentVolumeClaim", (spec.get("source") or {}).get("persistentVolumeClaimName"), key(doc)))
    if kind in ("RoleBinding", "ClusterRoleBinding"):
        ref = doc.get("roleRef") or {}
        index["uses"].append((ref.get("kind"), ref.get("name"), key(doc)))
        for s in doc.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                if s.get("namespace") != NAMESPACE:
                    errs.append(f"{key(doc)}: subject {s.get('name')} outside {NAMESPACE}")
                index["uses"].append(("ServiceAccount", s.get("name"), key(doc)))
    return errs


def lint_kustomization(doc, path, images):
    errs = []
    if doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or doc.get("kind") != "Kustomization":
        errs.append("not a kustomize.config.k8s.io/v1beta1 Kustomization")
    listed = doc.get("resources") or []
    for r in listed:
        if not (path.parent / r).is_file():
            errs.append(f"resource {r} does not exist")
    for f in sorted(path.parent.glob("*.yaml")):
        if f.name != path.name and f.name not in listed:
            errs.append(f"{f.name} is not listed in resources")
    for img in doc.get("images") or []:
        if img.get("name") not in images:
            errs.append(f"images: {img.get('name')} is not used by any container")
    return errs


# --- files ---------------------------------------------------------------------------


def check_yaml_file(path, rel, versions, index):
    errs = []
    try:
        docs = load_docs(path)
    except yaml.YAMLError as e:
        return [f"YAML: {e}"], "unparsable"
    if not docs:
        return ["no documents"], "empty"
    kinds = []
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            errs.append("a document without apiVersion/kind")
            continue
        kinds.append(doc["kind"])
        if doc["kind"] == "Kustomization":
            index["kustomizations"].append((doc, path, rel))
            continue
        index["defs"].add((doc["kind"], name_of(doc)))
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group in ("snapshot.storage.k8s.io", "groupsnapshot.storage.k8s.io"):
            schema = SNAPSHOT_SCHEMAS.get(doc["kind"])
            if schema is None:
                errs.append(f"{key(doc)}: no schema for {doc['apiVersion']} {doc['kind']}")
            else:
                for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                    where = ".".join(str(p) for p in e.absolute_path) or "(root)"
                    errs.append(f"{key(doc)}: snapshot CRD schema: {where}: {e.message}")
        else:
            for v in versions:
                try:
                    kv.validate(doc, v, strict=True)
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path) or "(root)"
                    errs.append(f"{key(doc)}: Kubernetes {v} schema: {where}: {e.message}")
                except kv.SchemaNotFoundError as e:
                    errs.append(f"{key(doc)}: {e.message}")
        for c in (pod_spec(doc) or {}).get("containers") or []:
            index["images"].add(c.get("image", "").rsplit(":", 1)[0])
        errs += lint_doc(doc, rel, index)
    return errs, f"{len(docs)} document(s): {', '.join(sorted(set(kinds)))}"


def leaves(table, prefix=()):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def check_toml_file(path, rel, containerd, index):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        return [f"TOML: {e}"], "unparsable"
    errs = []
    if path.name.startswith("thinboxd"):
        return check_thinboxd_config(data, index)
    if path.name.startswith("configuration-"):
        qemu = (data.get("hypervisor") or {}).get("qemu") or {}
        if qemu.get("disable_block_device_use") is not False:
            errs.append("[hypervisor.qemu] disable_block_device_use must be the boolean false")
        if qemu.get("block_device_driver") != "virtio-blk":
            errs.append("[hypervisor.qemu] block_device_driver must be \"virtio-blk\"")
        extra = (set(data) - {"hypervisor"}) | {f"hypervisor.{k}" for k in set(data.get("hypervisor") or {}) - {"qemu"}}
        if extra:
            errs.append(f"unexpected tables {sorted(extra)} in a drop-in meant for [hypervisor.qemu]")
        return errs, "Kata drop-in: parsed, keys checked"
    if path.name.startswith("containerd-"):
        cri = ((data.get("plugins") or {}).get("io.containerd.grpc.v1.cri") or {}).get("containerd") or {}
        proxy = (data.get("proxy_plugins") or {}).get("thinbox") or {}
        index["containerd_address"] = proxy.get("address")
        if data.get("version") != 2:
            errs.append("version = 2 missing (containerd 1.6 reads version 1 otherwise)")
        if proxy.get("type") != "snapshot" or proxy.get("address") != SOCKET:
            errs.append(f"[proxy_plugins.thinbox] must be type snapshot at {SOCKET}")
        if cri.get("snapshotter") != "thinbox":
            errs.append("CRI snapshotter is not thinbox")
        if ((cri.get("runtimes") or {}).get("kata") or {}).get("runtime_type") != "io.containerd.kata.v2":
            errs.append("runtimes.kata.runtime_type is not io.containerd.kata.v2")
        with tempfile.TemporaryDirectory() as tmp:
            # The snippet alone as containerd's config: the dump shows what
            # containerd made of each key. Its root/state point into tmp so
            # nothing global is touched (config dump opens nothing anyway).
            cfg = Path(tmp) / "config.toml"
            cfg.write_text(path.read_text())
            r = subprocess.run([containerd, "--config", str(cfg), "config", "dump"],
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                return errs + [f"containerd config dump failed: {r.stderr.strip()}"], "containerd"
            dump = tomllib.loads(r.stdout)
        for leaf, value in leaves(data):
            cur = dump
            for part in leaf:
                cur = cur.get(part) if isinstance(cur, dict) else None
            if cur != value:
                errs.append(f"containerd ignores or changes {'.'.join(leaf)} = {value!r} (effective: {cur!r})")
        ver = subprocess.run([containerd, "--version"], capture_output=True, text=True).stdout.split()
        return errs, f"parsed; every key survives `containerd config dump` (containerd {ver[2] if len(ver) > 2 else '?'})"
    return errs, "parsed"


def check_thinboxd_config(data, index):
    """thinboxd's config as the unit reads it (/etc/thinbox/config.toml).

    Only the shape is checked here (thinboxd itself refuses unknown keys
    within the sections, naming them); what matters to the rest of deploy/ is
    checked against it: devices kept on exit, the sockets containerd and the
    sidecars use."""
    errs = []
    for k in sorted(set(data) - CONFIG_KEYS):
        errs.append(f"unknown key or section {k!r} (thinboxd knows {sorted(CONFIG_KEYS)})")
    for k in ("pool", "snapshot", "csi"):
        if not isinstance(data.get(k, {}), dict):
            errs.append(f"{k} must be a section [{k}]")
    if data.get("release_on_exit", False) is not False:
        errs.append("release_on_exit must stay false on a node (a restart or upgrade would take running sandboxes' devices)")
    snap, csi = data.get("snapshot") or {}, data.get("csi") or {}
    index["config_address"] = snap.get("address", SOCKET) if snap.get("enabled", True) else None
    if snap.get("enabled", True) is not True or snap.get("address", SOCKET) != SOCKET:
        errs.append(f"[snapshot] must be served at {SOCKET} (containerd's proxy plugin address)")
    if csi.get("enabled", True) is not True or csi.get("endpoint", CSI_ENDPOINT) != CSI_ENDPOINT:
        errs.append(f"[csi] must be served at {CSI_ENDPOINT} (the DaemonSet's registration path and hostPath)")
    return errs, "thinboxd config: keys, release_on_exit and sockets checked"


def check_unit_file(path, rel, scratch, index):
    errs = []
    text = path.read_text()
    directives = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            directives.setdefault(k.strip(), []).append(v.strip())
    want = {"Restart": "on-failure", "KillMode": "mixed", "TimeoutStopSec": "30"}
    for k, v in want.items():
        if directives.get(k, [None])[-1] != v:
            errs.append(f"{k}={v} expected")
    if directives.get("Type", [None])[-1] not in ("exec", "simple"):
        errs.append("Type=exec (or simple) expected: thinboxd does not speak sd_notify and does not fork")
    before = " ".join(directives.get("Before", [])).split()
    wanted = " ".join(directives.get("WantedBy", []) + directives.get("RequiredBy", [])).split()
    for u in ("containerd.service", "kubelet.service"):
        if u not in before:
            errs.append(f"Before={u} expected (it needs thinboxd's socket before any pod starts)")
    if "containerd.service" not in wanted or "multi-user.target" not in wanted:
        errs.append("WantedBy=multi-user.target and containerd.service expected (starting containerd starts thinboxd)")
    if "LimitNOFILE" not in directives:
        errs.append("LimitNOFILE expected")
    start = directives.get("ExecStart", [""])[-1]
    argv = start.split()
    if not argv or argv[0] != THINBOXD:
        errs.append(f"ExecStart must run {THINBOXD}")
    if "--release-on-exit" in start:
        errs.append("ExecStart must not release devices on exit (running containers keep them)")
    m_cfg = re.search(r"--config[ =](\S+)", start)
    if not m_cfg or m_cfg.group(1) != CONFIG:
        errs.append(f"ExecStart must read the installed config --config {CONFIG}")
    for flag in ("--snapshotter-address", "--csi-endpoint", "--root", "--no-snapshotter", "--no-csi"):
        if flag in start:
            errs.append(f"ExecStart must not pass {flag}: the defaults and {CONFIG} say where thinboxd serves")
    for k in UNIT_NAMESPACING:
        if k in directives:
            errs.append(f"{k}= gives the daemon its own mount namespace (its pool mount must be the host's)")
    for k in UNIT_DEVICES:
        if k in directives:
            errs.append(f"{k}= restricts device access (thinboxd makes and hands out loop and dm devices)")
    index["unit_config"] = m_cfg.group(1) if m_cfg else None

    root = scratch / "systemd-root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(path, root / "etc/systemd/system" / path.name)
    for k in ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop", "ExecReload"):
        for cmd in directives.get(k, []):
            exe = cmd.lstrip("-@:+!").split()[0]
            if exe.startswith("/") and not cmd.startswith("-"):
                stub = root / exe.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", path.name],
                       capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or out:
        errs.append(f"systemd-analyze verify (exit {r.returncode}): {out}")
    return errs, "systemd-analyze verify clean; directives checked"


def validate_tree(repo, versions, containerd, scratch):
    """Checks every file under repo/deploy; returns {relative path: (errors, summary)}."""
    files = sorted(p for d in ("deploy/kubernetes", "deploy/examples") for p in (repo / d).rglob("*")
                   if p.suffix in (".yaml", ".yml"))
    tomls = sorted((repo / "deploy").rglob("*.toml"))
    units = sorted((repo / "deploy").rglob("*.service"))
    if not files or not tomls or not units:
        sys.exit("deploy/: expected manifests, TOML files and systemd units; found "
                 f"{len(files)}, {len(tomls)}, {len(units)}")

    index = {"defs": set(), "uses": [], "images": set(), "kustomizations": []}
    results = {}  # rel -> (errors, summary)
    for p in files:
        rel = str(p.relative_to(repo))
        results[rel] = check_yaml_file(p, rel, versions, index)
    for doc, path, rel in index["kustomizations"]:
        results[rel][0].extend(lint_kustomization(doc, path, index["images"]))
    for p in tomls:
        rel = str(p.relative_to(repo))
        results[rel] = check_toml_file(p, rel, containerd, index)
    for p in units:
        rel = str(p.relative_to(repo))
        results[rel] = check_unit_file(p, rel, scratch, index)

    # References between objects (a PVC's class, a binding's role, ...), charged
    # to the file of the object that refers.
    builtin = {("RuntimeClass", None), ("StorageClass", None)}
    for kind, name, where in index["uses"]:
        if (kind, name) in builtin or (kind, name) in index["defs"]:
            continue
        rel = next((r for r in results if r.endswith(".yaml") and results[r][1] != "unparsable" and any(
            where == key(d) for d in load_docs(repo / r) if isinstance(d, dict))), "deploy/")
        results.setdefault(rel, ([], ""))[0].append(f"{where}: {kind} {name!r} is not defined in deploy/")
    if index.get("containerd_address") != index.get("config_address", SOCKET):
        results.setdefault("deploy/host", ([], ""))[0].append(
            f"containerd proxy address {index.get('containerd_address')} != thinboxd's snapshot socket "
            f"{index.get('config_address')}")
    if index.get("registration_path") is None:
        results.setdefault("deploy/kubernetes", ([], ""))[0].append("no node DaemonSet thinbox-csi-node with a registration path")
    return results


# Faults injected into a copy of deploy/, one at a time: each must make its file
# invalid with a reason containing the given text. Guards against a validator
# that passes everything (a changed package, a check that silently stopped running).
FAULTS = [
    ("deploy/kubernetes/node-daemonset.yaml", "          volumeMounts:\n            - name: plugin-dir\n              mountPath: /csi\n            - name: registration-dir",
     "          volumeMount:\n            - name: plugin-dir\n              mountPath: /csi\n            - name: registration-dir", "schema"),
    ("deploy/kubernetes/csidriver.yaml", "attachRequired: false", 'attachRequired: "false"', "schema"),
    ("deploy/kubernetes/runtimeclass.yaml", "apiVersion: node.k8s.io/v1", "apiVersion: node.k8s.io/v2", "find schema"),
    ("deploy/kubernetes/volumesnapshotclass.yaml", "deletionPolicy: Delete", "deletionPolicy: Keep", "snapshot CRD schema"),
    ("deploy/examples/snapshot-restore.yaml", "    persistentVolumeClaimName: thinbox-demo-block",
     "    persistentVolumeClaimName: thinbox-demo-block\n    volumeSnapshotContentName: x", "snapshot CRD schema"),
    ("deploy/kubernetes/rbac.yaml", "kind: ServiceAccount\n", "kind: ServiceAccount\nkind: ServiceAccount\n", "duplicate key"),
    ("deploy/kubernetes/kustomization.yaml", "  - runtimeclass.yaml\n", "", "not listed"),
    ("deploy/kubernetes/storageclasses.yaml", "  kind: block", "  kind: blok", "parameter kind"),
    ("deploy/kubernetes/node-daemonset.yaml", "--leader-election-namespace=$(NAMESPACE)",
     "--leader-election-namespace=$(NAMESPAC)", "$(NAMESPAC)"),
    ("deploy/kubernetes/node-daemonset.yaml", "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.thinbox.io/csi.sock",
     "--kubelet-registration-path=/var/lib/kubelet/plugins/thinbox/csi.sock", "registration path"),
    ("deploy/kubernetes/node-daemonset.yaml", "            - --capacity-ownerref-level=1\n", "", "--capacity-ownerref-level=1"),
    ("deploy/kubernetes/node-daemonset.yaml", "      containers:\n",
     "      containers:\n        - name: thinbox-csi\n          image: thinbox/thinbox-csi:0.1.0\n", "upstream sidecars"),
    ("deploy/kubernetes/node-daemonset.yaml", "            allowPrivilegeEscalation: false\n",
     "            privileged: true\n", "privileged"),
    ("deploy/kubernetes/node-daemonset.yaml", "            path: /var/lib/kubelet/plugins/csi.thinbox.io\n",
     "            path: /var/lib/kubelet/plugins/csi.thinbox.io/csi.sock\n", "host directory"),
    ("deploy/examples/ephemeral-inline-pod.yaml", "          thinbox.io/sandbox: kata\n          thinbox.io/encryption",
     "          thinbox.io/sandbox: runc\n          thinbox.io/encryption", "encryption needs"),
    ("deploy/kubernetes/volumegroupsnapshotclass.yaml", "deletionPolicy: Delete", "deletionPolicy: Keep",
     "snapshot CRD schema"),
    ("deploy/kubernetes/node-daemonset.yaml", "            - --feature-gates=CSIVolumeGroupSnapshot=true\n", "",
     "CSIVolumeGroupSnapshot"),
    ("deploy/examples/pvc-pod-runc.yaml", "storageClassName: thinbox-block", "storageClassName: thinbox-blk", "not defined"),
    ("deploy/host/containerd-kata-thinbox.toml", '    runtime_type = "io.containerd.kata.v2"',
     '    runtime_type = "io.containerd.kata.v2"\n    snapshotter = "thinbox"', "containerd ignores"),
    ("deploy/host/configuration-thinbox.toml", "disable_block_device_use = false", 'disable_block_device_use = "false"',
     "disable_block_device_use"),
    ("deploy/systemd/thinboxd.service", "KillMode=mixed", "KillMode=mixed\nRestartSecs=2", "systemd-analyze verify"),
    ("deploy/systemd/thinboxd.service", "--config /etc/thinbox/config.toml",
     "--config /etc/thinbox/config.toml --release-on-exit", "release"),
    ("deploy/systemd/thinboxd.service", "Before=containerd.service kubelet.service", "Before=containerd.service",
     "kubelet.service"),
    ("deploy/systemd/thinboxd.service", "KillMode=mixed", "KillMode=mixed\nPrivateTmp=yes", "mount namespace"),
    ("deploy/host/thinboxd.toml", "#release_on_exit = false", "release_on_exit = true", "release_on_exit"),
    ("deploy/host/thinboxd.toml", "[csi]\n", "[csi]\nendpoint = \"unix:///run/thinbox/csi.sock\"\n", "[csi] must be served"),
    ("deploy/host/thinboxd.toml", "[pool]\n", "[pools]\n", "unknown key or section"),
]


def self_test(repo, versions, containerd, scratch):
    missed = []
    for i, (rel, old, new, expect) in enumerate(FAULTS):
        tree = scratch / "self-test"
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(repo / "deploy", tree / "deploy")
        target = tree / rel
        text = target.read_text()
        if text.count(old) < 1:
            missed.append(f"fault {i}: {old!r} not found in {rel} (update FAULTS)")
            continue
        target.write_text(text.replace(old, new, 1))
        errs = validate_tree(tree, versions, containerd, scratch)
        if not any(expect in e for e in errs.get(rel, ([], ""))[0]):
            missed.append(f"fault {i} in {rel} ({new.strip()[:60]!r}) not reported with {expect!r}")
    shutil.rmtree(scratch / "self-test", ignore_errors=True)
    return missed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--kubernetes-versions", required=True, help="comma-separated, e.g. 1.31,1.37")
    ap.add_argument("--containerd", required=True)
    ap.add_argument("--scratch", type=Path, required=True)
    args = ap.parse_args()
    versions = [v.strip() for v in args.kubernetes_versions.split(",") if v.strip()]
    supported = kv.all_versions()
    for v in versions:
        if not any(s.startswith(v + ".") or s == v for s in supported):
            sys.exit(f"kubernetes-validate knows {supported[0]}..{supported[-1]}, not {v}")
    repo = args.repo.resolve()
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)

    missed = self_test(repo, versions[:1], args.containerd, scratch)
    if missed:
        print("self-test FAILED: the validator let injected faults through:")
        for m in missed:
            print(f"        - {m}")
        return 1
    print(f"self-test: all {len(FAULTS)} injected faults detected")

    results = validate_tree(repo, versions, args.containerd, scratch)
    valid = invalid = 0
    for rel in sorted(results):
        errs, summary = results[rel]
        if errs:
            invalid += 1
            print(f"INVALID {rel}")
            for e in errs:
                print(f"        - {e}")
        else:
            valid += 1
            print(f"ok      {rel}  [{summary}]")
    print(f"deploy: {valid} valid, {invalid} invalid  (Kubernetes {', '.join(versions)} strict schemas, "
          f"kubernetes-validate {kv.__version__})")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
