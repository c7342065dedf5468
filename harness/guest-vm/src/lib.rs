//! Throwaway QEMU guests for Thinbox's tests and benchmarks: the guest side
//! of virtio-blk passthrough (hot-plugged Thinbox devices), 9p and virtio-fs.
//!
//! Lifecycle:
//!
//! 1. [`GuestImage::ensure`] returns a cached guest, building it on first use
//!    (about a minute, mostly unpacking the kernel package): Debian's current
//!    `linux-image-6.1.0-N-amd64` as an uncompressed PVH ELF and an
//!    uncompressed cpio initramfs with busybox, the virtio/ext4/xfs/9p/
//!    virtio-fs/loop/dm-thin modules and host tools (fio, mkfs.ext4,
//!    mkfs.xfs, dmsetup, blkid) with their libraries. See [`image`].
//! 2. [`Vm::boot`] starts `qemu-system-x86_64` (q35, `-nodefaults`, the ELF
//!    kernel booted through PVH) with the disks, shares and empty PCIe root
//!    ports of a [`VmSpec`], and returns once the guest's shell answers:
//!    3–5 s under TCG. [`AccelChoice::Auto`] tries KVM first, once per
//!    process, and stays on TCG if QEMU dies or the guest does not come up
//!    (a PVM host's KVM aborts standard guests).
//! 3. [`Vm::run`] runs shell scripts in the guest over a virtio serial port
//!    ([`console`]) and returns their exit status and output; [`Vm::wait_for_disk`] finds a
//!    virtio-blk disk by serial; hot-plug goes over QMP
//!    ([`Vm::qmp_socket`], bus [`Vm::hotplug_bus`]), which this crate leaves
//!    to its callers (`thinbox_block_passthrough::qmp`).
//! 4. [`Vm::shutdown`] powers the guest off; dropping a [`Vm`] kills QEMU,
//!    and so does the death of the process that booted it (QEMU runs under
//!    a guard shell holding a pipe from this process). The work directory
//!    keeps `kernel.log` (the guest's kernel console), `console.log`
//!    (everything the guest's shell sent) and `qemu.log`.
//!
//! Everything is synchronous std code; QMP clients bring their own runtime.

pub mod console;
pub mod cpio;
mod error;
pub mod image;
mod vm;

pub use error::Error;
pub use image::GuestImage;
pub use vm::{Accel, AccelChoice, BootDisk, Output, Share9p, VirtioFs, Vm, VmSpec};
