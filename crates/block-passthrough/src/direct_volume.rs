//! Kata direct-volume records: the file format and the directory layout the
//! Kata runtime reads (`kata-ctl direct-volume add` writes the same).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;
use serde::{Deserialize, Serialize};

/// Where the Kata runtime looks for direct-volume records.
pub const KATA_DIRECT_VOLUMES: &str = "/run/kata-containers/shared/direct-volumes";
/// The record's file name inside its directory.
pub const MOUNT_INFO: &str = "mountInfo.json";

/// Keys of [`MountInfo::metadata`] that Kata's Go runtime acts on
/// (`src/runtime/pkg/direct-volume/utils.go`, read in
/// `src/runtime/virtcontainers/container.go`).
pub mod metadata {
    /// `ephemeral`: the agent encrypts the device (LUKS2) with a key it
    /// makes and throws away; needs [`CREATE_FILESYSTEM`].
    pub const ENCRYPTION_KEY: &str = "encryptionKey";
    /// `true`: the agent makes the record's `fstype` on the device.
    pub const CREATE_FILESYSTEM: &str = "createFilesystem";
    /// A group id the agent gives the filesystem's files (a pod's fsGroup).
    pub const FS_GROUP: &str = "fsGroup";
}

/// Errors of the direct-volume store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("volume path {0} is not absolute")]
    NotAbsolute(PathBuf),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt direct-volume record {path}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// One record, as the Kata runtime parses it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    /// How the runtime attaches the volume: "block" for a host block device.
    #[serde(rename = "volume-type")]
    pub volume_type: String,
    /// Host device (or image file) to attach.
    pub device: String,
    /// Filesystem the guest mounts.
    pub fstype: String,
    /// Free-form metadata for the runtime and agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Mount options inside the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The directory of direct-volume records.
#[derive(Clone, Debug)]
pub struct DirectVolumes {
    root: PathBuf,
}

impl Default for DirectVolumes {
    fn default() -> Self {
        DirectVolumes::new(KATA_DIRECT_VOLUMES)
    }
}

impl DirectVolumes {
    /// Records under `root` (normally [`KATA_DIRECT_VOLUMES`]).
    pub fn new(root: impl Into<PathBuf>) -> DirectVolumes {
        DirectVolumes { root: root.into() }
    }

    /// The sandbox that holds the volume: the Kata runtime writes an empty
    /// file named by the sandbox id beside the record when a pod's sandbox
    /// takes the volume (`RecordSandboxID` in Kata's
    /// `src/runtime/pkg/direct-volume/utils.go`). `None`: no record, or no
    /// sandbox holds it.
    pub fn sandbox(&self, volume_path: &Path) -> Result<Option<String>, Error> {
        let dir = self.dir(volume_path)?;
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("list", &dir)(e)),
        };
        for entry in entries {
            let name = entry.map_err(io_err("list", &dir))?.file_name();
            if name != MOUNT_INFO
                && let Some(id) = name.to_str()
            {
                return Ok(Some(id.to_owned()));
            }
        }
        Ok(None)
    }

    /// The record directory of the volume mounted at `volume_path`: its path,
    /// base64url-encoded with padding (Go's `base64.URLEncoding`), under the root.
    pub fn dir(&self, volume_path: &Path) -> Result<PathBuf, Error> {
        if !volume_path.is_absolute() {
            return Err(Error::NotAbsolute(volume_path.to_owned()));
        }
        Ok(self.root.join(URL_SAFE.encode(volume_path.as_os_str().as_encoded_bytes())))
    }

    /// Writes the record for `volume_path`, replacing any: a private directory
    /// (0700), the file (0600) written aside, synced and renamed into place, so
    /// the runtime never reads half a record.
    pub fn add(&self, volume_path: &Path, info: &MountInfo) -> Result<(), Error> {
        let dir = self.dir(volume_path)?;
        DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err("create", &dir))?;
        let tmp = dir.join(format!(".{MOUNT_INFO}.tmp"));
        let json = serde_json::to_vec(info).map_err(|source| Error::Corrupt { path: tmp.clone(), source })?;
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&json).and_then(|_| f.sync_all()).map_err(io_err("write", &tmp))?;
        let file = dir.join(MOUNT_INFO);
        fs::rename(&tmp, &file).map_err(io_err("rename into", &file))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("sync", &dir))
    }

    /// The record for `volume_path`, if there is one.
    pub fn get(&self, volume_path: &Path) -> Result<Option<MountInfo>, Error> {
        let file = self.dir(volume_path)?.join(MOUNT_INFO);
        match fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| Error::Corrupt { path: file, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &file)(e)),
        }
    }

    /// Removes the record and its directory; returns whether there was one.
    pub fn remove(&self, volume_path: &Path) -> Result<bool, Error> {
        let dir = self.dir(volume_path)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove", &dir)(e)),
        }
    }

    /// Every volume path with a record (directories whose names do not decode
    /// are not ours to judge and are left out).
    pub fn list(&self) -> Result<Vec<PathBuf>, Error> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry.map_err(io_err("list", &self.root))?.file_name();
            if let Ok(bytes) = URL_SAFE.decode(name.as_encoded_bytes()) {
                out.push(PathBuf::from(OsString::from_vec(bytes)));
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TARGET: &str = "/var/lib/kubelet/pods/7f0c/volumes/kubernetes.io~csi/pvc-1/mount";

    #[test]
    fn directory_name_is_go_url_encoding_with_padding() {
        let store = DirectVolumes::new("/r");
        // python3 -c 'import base64; print(base64.urlsafe_b64encode(b"/a?b>").decode())'
        assert_eq!(store.dir(Path::new("/a?b>")).unwrap(), Path::new("/r/L2E_Yj4="));
        assert!(matches!(store.dir(Path::new("rel/path")), Err(Error::NotAbsolute(_))));
    }

    #[test]
    fn records_round_trip_with_kata_keys_and_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = DirectVolumes::new(tmp.path().join("direct-volumes"));
        let info = MountInfo {
            volume_type: "block".into(),
            device: "/dev/dm-3".into(),
            fstype: "ext4".into(),
            metadata: BTreeMap::from([("thinbox.io/volume".into(), "v1".into())]),
            options: vec!["rw".into()],
        };
        let target = Path::new(TARGET);
        assert_eq!(store.get(target).unwrap(), None);
        store.add(target, &info).unwrap();
        let dir = store.dir(target).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&fs::read(dir.join(MOUNT_INFO)).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"volume-type": "block", "device": "/dev/dm-3", "fstype": "ext4",
                "metadata": {"thinbox.io/volume": "v1"}, "options": ["rw"]})
        );
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(dir.join(MOUNT_INFO)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(store.get(target).unwrap(), Some(info.clone()));
        assert_eq!(store.list().unwrap(), vec![PathBuf::from(TARGET)]);
        // Replacing is atomic and leaves no temporary file.
        store.add(target, &MountInfo { device: "/dev/dm-4".into(), ..info }).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        assert!(store.remove(target).unwrap());
        assert!(!dir.exists());
        assert!(!store.remove(target).unwrap(), "removing twice is fine");
        assert_eq!(store.list().unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_default() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirectVolumes::new(tmp.path());
        let dir = store.dir(Path::new(TARGET)).unwrap();
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(MOUNT_INFO), "{not json").unwrap();
        assert!(matches!(store.get(Path::new(TARGET)), Err(Error::Corrupt { .. })));
    }
}
