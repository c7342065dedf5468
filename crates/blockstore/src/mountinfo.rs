//! The mount table of this process, from `/proc/self/mountinfo` (proc(5)).
//!
//! One line per mount:
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2) (3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)
//! ```
//!
//! mount id, parent id, `major:minor`, root, mount point, mount options, zero
//! or more optional fields ended by `-`, filesystem type, source, super
//! options. The kernel writes a space, tab, newline or backslash in root,
//! mount point and source as an octal escape (`\040`, `\011`, `\012`,
//! `\134`); every other byte, including non-UTF-8 ones, is written as is.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Where the kernel shows this process's mounts.
pub const PATH: &str = "/proc/self/mountinfo";

/// One mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount id (reused after unmount).
    pub id: u32,
    /// Id of the parent mount (its own for the root of the mount tree).
    pub parent: u32,
    /// `st_dev` of files on this filesystem: major, minor.
    pub dev: (u32, u32),
    /// The directory of the filesystem that forms this mount's root (a bind
    /// mount of a subdirectory shows it here).
    pub root: PathBuf,
    /// Where it is mounted, relative to this process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,noatime`, ...).
    pub options: String,
    /// Filesystem type (`xfs`, `fuse.sshfs`, ...).
    pub fs_type: String,
    /// Filesystem-specific source (a device, or `none`); lossy if not UTF-8.
    pub source: String,
    /// Per-superblock options (`rw,attr2,prjquota`, ...).
    pub super_options: String,
}

/// Parses the contents of a mountinfo file; malformed lines are skipped.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

/// Reads and parses [`PATH`].
pub fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read(PATH)?))
}

/// The mount at `path` that is visible there (the last one mounted on it), if any.
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(read()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Whether something is mounted at `path` (compared as given: resolve symlinks first).
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(read()?.iter().any(|m| m.mount_point == path))
}

/// Mount points at or below `prefix` (whole path components), in mount order.
pub fn mounts_under(prefix: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(read()?.into_iter().map(|m| m.mount_point).filter(|mp| mp.starts_with(prefix)).collect())
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let mut fields = line.split(|&b| b == b' ');
    let mut next = || fields.next().filter(|f| !f.is_empty());
    let id = number(next()?)?;
    let parent = number(next()?)?;
    let (major, minor) = split_once(next()?, b':')?;
    let dev = (number(major)?, number(minor)?);
    let root = path(next()?);
    let mount_point = path(next()?);
    let options = text(next()?);
    // Optional fields (`shared:1`, `master:2`, ...) up to the separator.
    while next()? != b"-" {}
    let fs_type = text(next()?);
    let source = String::from_utf8_lossy(&unescape(next()?)).into_owned();
    let super_options = text(next()?);
    Some(MountEntry { id, parent, dev, root, mount_point, options, fs_type, source, super_options })
}

fn number(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn split_once(field: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = field.iter().position(|&b| b == sep)?;
    Some((&field[..at], &field[at + 1..]))
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(field).into_owned()
}

fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Undoes the kernel's octal escapes (`\040` for a space, ...): a backslash and
/// three octal digits make one byte; anything else stays as it is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if let Some(&[b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7']) = field.get(i..i + 4) {
            out.push(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'));
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};

    use super::{MountEntry, parse, unescape};

    const SAMPLE: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
25 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 master:2 - proc proc rw
98 22 7:3 / /var/lib/thinbox/dirs rw,noatime - xfs /dev/loop3 rw,attr2,inode64,logbufs=8,logbsize=32k,prjquota
99 22 7:4 / /mnt/a\\040b rw,noatime - xfs /dev/loop4 rw,attr2,prjquota
100 22 0:50 /sub\\134dir /mnt/back\\134slash\\011tab ro - tmpfs my\\040source rw,size=1024k
this line is not a mount
101 22 0:51 / /mnt/no-separator rw tmpfs tmpfs rw
102 x 0:52 / /mnt/bad-parent rw - tmpfs tmpfs rw
103 22 0:53 / /mnt/truncated rw - tmpfs
";

    #[test]
    fn parses_fields_and_optional_fields() {
        let m = parse(SAMPLE.as_bytes());
        assert_eq!(m.len(), 5, "{m:#?}");
        assert_eq!(
            m[1],
            MountEntry {
                id: 25,
                parent: 22,
                dev: (0, 21),
                root: "/".into(),
                mount_point: "/proc".into(),
                options: "rw,nosuid,nodev,noexec,relatime".into(),
                fs_type: "proc".into(),
                source: "proc".into(),
                super_options: "rw".into(),
            }
        );
        assert_eq!((m[0].id, m[0].parent, m[0].dev), (22, 1, (259, 2)));
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[0].source, "/dev/nvme0n1p2");
        // No optional fields.
        assert_eq!(m[2].mount_point, Path::new("/var/lib/thinbox/dirs"));
        assert_eq!((m[2].fs_type.as_str(), m[2].options.as_str()), ("xfs", "rw,noatime"));
        assert!(m[2].super_options.ends_with(",prjquota"));
    }

    #[test]
    fn a_mount_point_with_a_space_is_one() {
        let m = parse(SAMPLE.as_bytes());
        let spaced = Path::new("/mnt/a b");
        assert!(m.iter().any(|e| e.mount_point == spaced));
        assert!(!m.iter().any(|e| e.mount_point == Path::new(r"/mnt/a\040b")));
    }

    #[test]
    fn unescapes_root_mount_point_and_source() {
        let m = &parse(SAMPLE.as_bytes())[4];
        assert_eq!(m.root, Path::new(r"/sub\dir"));
        assert_eq!(m.mount_point, Path::new("/mnt/back\\slash\ttab"));
        assert_eq!(m.source, "my source");
        assert_eq!(m.options, "ro");
    }

    #[test]
    fn skips_malformed_lines() {
        let m = parse(SAMPLE.as_bytes());
        for bad in ["/mnt/no-separator", "/mnt/bad-parent", "/mnt/truncated"] {
            assert!(!m.iter().any(|e| e.mount_point == Path::new(bad)), "{bad} parsed");
        }
        assert_eq!(parse(b""), vec![]);
        assert_eq!(parse(b"\n\n"), vec![]);
    }

    #[test]
    fn keeps_non_utf8_paths() {
        let m = parse(b"30 22 0:40 / /mnt/\xff\\012x rw - tmpfs tmpfs rw\n");
        assert_eq!(m[0].mount_point, PathBuf::from(OsStr::from_bytes(b"/mnt/\xff\nx")));
    }

    #[test]
    fn unescape_leaves_what_is_no_escape() {
        assert_eq!(unescape(br"/a\040b\011c\012d\134e"), b"/a b\tc\nd\\e");
        assert_eq!(unescape(br"/plain"), b"/plain");
        assert_eq!(unescape(br"/end\040"), b"/end ");
        assert_eq!(unescape(br"/trail\04"), br"/trail\04");
        assert_eq!(unescape(br"/big\777"), br"/big\777");
        assert_eq!(unescape(br"/x\9999"), br"/x\9999");
    }

    #[test]
    fn reads_this_process_mounts() {
        // Reading it needs procfs, so /proc is a mount.
        let proc = Path::new("/proc");
        assert!(super::read().unwrap().iter().any(|e| e.mount_point == proc && e.fs_type == "proc"));
        assert!(super::is_mount_point(proc).unwrap());
        assert_eq!(super::mount_at(proc).unwrap().map(|e| e.fs_type), Some("proc".to_owned()));
        assert!(super::mounts_under(Path::new("/")).unwrap().iter().any(|p| p == proc));
        assert!(!super::is_mount_point(Path::new("/proc/self")).unwrap());
    }
}
