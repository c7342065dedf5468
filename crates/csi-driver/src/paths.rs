//! Checks on paths and ids from requests, before any path is built from them
//! or anything is mounted there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, invalid};

/// Longest id or name accepted (CSI strings are at most 128 bytes).
const MAX_ID: usize = 128;
/// Largest map accepted, keys and values together (CSI: 4 KiB).
const MAX_MAP: usize = 4096;
/// Longest path component, and path, the kernel takes (NAME_MAX, PATH_MAX).
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4095;

/// A name the CO gives (CreateVolume's, CreateSnapshot's, an inline volume's
/// handle): non-empty, at most 128 bytes as CSI says. It is stored, never
/// joined to a path.
pub fn name<'a>(name: &'a str, field: &str) -> Result<&'a str> {
    if name.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    if name.len() > MAX_ID {
        return Err(invalid(format!("{field} is {} bytes; CSI allows at most {MAX_ID}", name.len())));
    }
    Ok(name)
}

/// A map of a request (parameters, volume context): at most 4 KiB of keys
/// and values, as CSI says.
pub fn map(m: &HashMap<String, String>, field: &str) -> Result<()> {
    let bytes: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_MAP {
        return Err(invalid(format!("{field} holds {bytes} bytes; CSI allows at most {MAX_MAP}")));
    }
    Ok(())
}

/// A volume id from a request: non-empty, at most 128 bytes of `[A-Za-z0-9._-]`.
/// Ids are only ever looked up in our tables, never joined to a path; a
/// well-formed id that is not ours is NOT_FOUND, a malformed one cannot be ours
/// either.
pub fn volume_id(id: &str) -> Result<&str> {
    object_id(id, "volume")
}

/// An id of a volume or snapshot (`what`), checked as [`volume_id`] says.
pub fn object_id<'a>(id: &'a str, what: &str) -> Result<&'a str> {
    if id.is_empty() {
        return Err(invalid(format!("{what} id is required")));
    }
    if id.len() > MAX_ID || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(Error::NotFound(format!("{what} {id:?} does not exist")));
    }
    Ok(id)
}

/// A target (or staging) path from a request: absolute, without `..`, and
/// inside the kubelet directory once its parent's symlinks are resolved (the
/// last component is ours to create, so it must not be a symlink either).
pub fn target(path: &str, field: &str, kubelet_dir: &Path) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    let p = Path::new(path);
    // On the string: `Path::components` drops a `.` inside a path.
    if !p.is_absolute() || path.split('/').any(|c| c == "." || c == "..") {
        return Err(invalid(format!("{field} {path:?} must be an absolute path without . or ..")));
    }
    if path.len() > PATH_MAX || path.split('/').any(|c| c.len() > NAME_MAX) {
        return Err(invalid(format!("{field} is longer than the kernel takes ({PATH_MAX} bytes, {NAME_MAX} per component)")));
    }
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(invalid(format!("{field} {path:?} has no parent directory")));
    };
    let root = kubelet_dir.canonicalize().map_err(Error::io("resolve kubelet directory", kubelet_dir))?;
    let parent = match parent.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!("{field} parent {} does not exist", parent.display())));
        }
        Err(e) => return Err(Error::io("resolve", parent)(e)),
    };
    if !parent.starts_with(&root) {
        return Err(invalid(format!("{field} {path:?} is outside the kubelet directory {}", root.display())));
    }
    let resolved = parent.join(name);
    if resolved.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(invalid(format!("{field} {path:?} is a symlink")));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tonic::Code;

    #[test]
    fn ids_are_checked_before_lookup() {
        assert_eq!(volume_id("tb-block-00ab-1").unwrap(), "tb-block-00ab-1");
        assert_eq!(volume_id("").unwrap_err().code(), Code::InvalidArgument);
        for bad in ["../x", "a/b", "a b", &"x".repeat(129)] {
            assert_eq!(volume_id(bad).unwrap_err().code(), Code::NotFound, "{bad}");
        }
    }

    #[test]
    fn targets_stay_inside_the_kubelet_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let kubelet = tmp.path().join("kubelet");
        std::fs::create_dir_all(kubelet.join("pods/p/volumes")).unwrap();
        std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), kubelet.join("pods/p/escape")).unwrap();
        std::os::unix::fs::symlink("/etc", kubelet.join("pods/p/volumes/link")).unwrap();
        let ok = kubelet.join("pods/p/volumes/mount");
        assert_eq!(target(ok.to_str().unwrap(), "target_path", &kubelet).unwrap(), ok.canonicalize().unwrap_or(ok.clone()));
        let code = |p: &str| target(p, "target_path", &kubelet).unwrap_err().code();
        assert_eq!(code(""), Code::InvalidArgument);
        assert_eq!(code("relative/mount"), Code::InvalidArgument);
        assert_eq!(code(&format!("{}/pods/p/../../../x", kubelet.display())), Code::InvalidArgument);
        assert_eq!(code(&format!("{}/pods/p/escape/mount", kubelet.display())), Code::InvalidArgument, "symlinked parent");
        assert_eq!(code(&format!("{}/pods/p/volumes/link", kubelet.display())), Code::InvalidArgument, "symlink target");
        assert_eq!(code("/etc/mount"), Code::InvalidArgument);
        assert_eq!(code(&format!("{}/pods/missing/mount", kubelet.display())), Code::NotFound);
        assert_eq!(code(&format!("{}/pods/p/./volumes/mount", kubelet.display())), Code::InvalidArgument, "a . inside");
        assert_eq!(code(&format!("{}/pods/p/volumes/{}", kubelet.display(), "m".repeat(256))), Code::InvalidArgument, "NAME_MAX");
        assert_eq!(code(&format!("{}/{}", kubelet.display(), "d/".repeat(2100))), Code::InvalidArgument, "PATH_MAX");
    }

    #[test]
    fn names_and_maps_keep_to_csi_limits() {
        assert_eq!(name(&"n".repeat(128), "name").unwrap().len(), 128);
        assert_eq!(name("", "name").unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(name(&"n".repeat(129), "name").unwrap_err().code(), Code::InvalidArgument);
        let m = |bytes: usize| HashMap::from([("k".to_owned(), "v".repeat(bytes - 1))]);
        assert!(map(&m(4096), "parameters").is_ok());
        assert_eq!(map(&m(4097), "parameters").unwrap_err().code(), Code::InvalidArgument);
    }
}
