//! An uncompressed `newc` cpio writer for the initramfs: the kernel unpacks
//! it without a decompressor (faster under TCG than gzip), and writing it here
//! lets the archive hold device nodes and root-owned files without staging
//! them on the host.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// What one archive path holds.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir,
    /// Contents copied from this host file (symlinks followed).
    File {
        from: PathBuf,
        mode: u32,
    },
    /// Contents given inline.
    Data {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: String,
    },
    CharDev {
        major: u32,
        minor: u32,
        mode: u32,
    },
}

/// Archive contents by path (relative, no leading slash). Parent directories
/// are added by [`Archive::write`], before anything inside them, because the
/// kernel's unpacker does not create missing parents.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    /// Adds (or replaces) `path`; a leading `/` is ignored.
    pub fn add(&mut self, path: &str, entry: Entry) {
        self.entries.insert(path.trim_start_matches('/').to_owned(), entry);
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// Writes the archive to `out`; returns its size in bytes.
    pub fn write(&self, out: &Path) -> io::Result<u64> {
        let mut dirs = std::collections::BTreeSet::new();
        for (path, entry) in &self.entries {
            let mut p = Path::new(path.as_str());
            if matches!(entry, Entry::Dir) {
                dirs.insert(path.clone());
            }
            while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
                dirs.insert(parent.to_string_lossy().into_owned());
                p = parent;
            }
        }
        let mut w = Writer { out: BufWriter::new(File::create(out)?), ino: 0, written: 0 };
        // Sorted, a parent comes before its children ("a" < "a/b").
        for d in &dirs {
            w.entry(d, S_IFDIR | 0o755, 2, 0, 0, &[])?;
        }
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir => {}
                Entry::File { from, mode } => {
                    let data = std::fs::read(from)?;
                    w.entry(path, S_IFREG | mode, 1, 0, 0, &data)?;
                }
                Entry::Data { data, mode } => w.entry(path, S_IFREG | mode, 1, 0, 0, data)?,
                Entry::Symlink { target } => w.entry(path, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())?,
                Entry::CharDev { major, minor, mode } => w.entry(path, S_IFCHR | mode, 1, *major, *minor, &[])?,
            }
        }
        w.entry("TRAILER!!!", 0, 1, 0, 0, &[])?;
        w.out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
        Ok(w.written)
    }
}

struct Writer {
    out: BufWriter<File>,
    ino: u32,
    written: u64,
}

impl Writer {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    /// One header ("070701" and thirteen 8-digit hex fields), the
    /// NUL-terminated name and the data, each padded to 4 bytes. Times are 0
    /// so the archive depends only on its contents.
    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rmajor: u32, rminor: u32, data: &[u8]) -> io::Result<()> {
        self.ino += 1;
        let size = u32::try_from(data.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: too large for cpio")))?;
        let fields = [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, name.len() as u32 + 1, 0];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The archive lists back with `cpio -t` semantics: parents first, every
    /// header aligned, names and sizes as given.
    #[test]
    fn newc_layout_parents_first_and_aligned() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Archive::default();
        a.add("/etc/thinbox/modules", Entry::Data { data: b"abc\n".to_vec(), mode: 0o644 });
        a.add("bin/sh", Entry::Symlink { target: "/bin/busybox".into() });
        a.add("dev/console", Entry::CharDev { major: 5, minor: 1, mode: 0o600 });
        let out = tmp.path().join("a.cpio");
        let size = a.write(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len() as u64, size);
        // Walk the headers back.
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            assert_eq!(off % 4, 0);
            assert_eq!(&bytes[off..off + 6], b"070701");
            let field = |i: usize| u32::from_str_radix(std::str::from_utf8(&bytes[off + 6 + i * 8..off + 14 + i * 8]).unwrap(), 16).unwrap();
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&bytes[off + 110..off + 110 + namesize - 1]).unwrap().to_owned();
            off = (off + 110 + namesize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
            if name == "etc/thinbox/modules" {
                assert_eq!(&bytes[off..off + size], b"abc\n");
                assert_eq!(mode, S_IFREG | 0o644);
            }
            off = (off + size).next_multiple_of(4);
            names.push(name);
        }
        assert_eq!(off, bytes.len());
        assert_eq!(names, ["bin", "dev", "etc", "etc/thinbox", "bin/sh", "dev/console", "etc/thinbox/modules"]);
    }
}
