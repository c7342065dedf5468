//! Fault injection for the crash-safety tests, compiled only with the
//! `fault-injection` feature. `THINBOX_FAULT=<point>` makes the process abort
//! (no unwinding, no destructors: like `kill -9`) when it reaches that
//! [`point`], or makes that [`error`] fail as a failing disk would.

/// Aborts the process if `THINBOX_FAULT` names `point`.
#[cfg(feature = "fault-injection")]
pub fn point(point: &'static str) {
    if std::env::var("THINBOX_FAULT").is_ok_and(|p| p == point) {
        eprintln!("thinbox: injected crash at {point}");
        std::process::abort();
    }
}

/// Without the `fault-injection` feature this compiles to nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_point: &'static str) {}

/// An I/O error (`EIO`) if `THINBOX_FAULT` names `point`.
#[cfg(feature = "fault-injection")]
pub fn error(point: &'static str) -> std::io::Result<()> {
    if std::env::var("THINBOX_FAULT").is_ok_and(|p| p == point) {
        eprintln!("thinbox: injected I/O error at {point}");
        return Err(std::io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()));
    }
    Ok(())
}

/// Without the `fault-injection` feature this compiles to nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn error(_point: &'static str) -> std::io::Result<()> {
    Ok(())
}
