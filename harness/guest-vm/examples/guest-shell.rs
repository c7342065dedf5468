//! Builds (or finds) the guest image and boots it, then runs each argument as
//! a guest script and prints its output: a manual check and a timing probe.
//! `cargo run -p thinbox-guest-vm --example guest-shell -- 'uname -a' 'lsmod' '@hold 60'`

use std::time::{Duration, Instant};

use thinbox_guest_vm::{GuestImage, Vm, VmSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("THINBOX_LOG")).with_writer(std::io::stderr).init();
    let t = Instant::now();
    let image = GuestImage::ensure(&GuestImage::default_cache_dir())?;
    eprintln!("image {} ({:.1} s)", image.kernel.parent().map(|p| p.display().to_string()).unwrap_or_default(), t.elapsed().as_secs_f64());
    let work = tempfile::Builder::new().prefix("thinbox-guest-").tempdir()?;
    let t = Instant::now();
    let mut vm = Vm::boot(&image, &VmSpec { hotplug_slots: 2, ..Default::default() }, work.path())?;
    eprintln!("booted on {:?} in {:.2} s; QMP at {}", vm.accel(), t.elapsed().as_secs_f64(), vm.qmp_socket().display());
    for script in std::env::args().skip(1) {
        // "@hold SECS": leave the guest idle, e.g. to look at it over QMP.
        if let Some(secs) = script.strip_prefix("@hold ") {
            std::thread::sleep(Duration::from_secs(secs.trim().parse()?));
            continue;
        }
        let t = Instant::now();
        let out = vm.run(&script, Duration::from_secs(600))?;
        print!("{}", out.stdout);
        eprintln!("[exit {} in {:.2} s]", out.status, t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    vm.shutdown()?;
    eprintln!("shut down in {:.2} s", t.elapsed().as_secs_f64());
    Ok(())
}
