//! The baseline: fio on the host, on the overlayfs a runC container sees.

use std::path::{Path, PathBuf};

use crate::Error;
use crate::fio::{Measurement, run_host};
use crate::jobs::{FioParams, Job};
use crate::report::{RowInfo, RowKind};
use crate::rows::{OVERLAY_SETUP, Overlay, Row};
use crate::sys::drop_caches;

/// runC: the host's fio on the merged dir.
#[derive(Debug)]
pub struct Runc {
    info: RowInfo,
    overlay: Overlay,
    scratch: PathBuf,
}

impl Runc {
    /// Sets up the overlay under `dir`.
    pub fn setup(dir: &Path, params: &FioParams) -> Result<Runc, Error> {
        let overlay = Overlay::new(dir, params.file_size)?;
        let info = RowInfo { kind: RowKind::Runc, guest: None, setup: format!("host fio on {OVERLAY_SETUP}"), unavailable: None };
        Ok(Runc { info, overlay, scratch: dir.to_owned() })
    }
}

impl Row for Runc {
    fn info(&self) -> &RowInfo {
        &self.info
    }

    fn run(&mut self, job: &Job, params: &FioParams) -> Result<Measurement, Error> {
        drop_caches()?;
        run_host(job, params, &self.overlay.file(), &self.scratch)
    }

    fn teardown(self: Box<Self>) -> Result<(), Error> {
        self.overlay.teardown()
    }
}
