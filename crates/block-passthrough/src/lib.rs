//! Handing host block devices and image files to VM sandboxes.
//!
//! Two ways, for two kinds of VM manager:
//!
//! * **Kata direct volumes** ([`DirectVolumes`]). A CSI driver that wants a
//!   volume to reach a Kata guest as virtio-blk, instead of being mounted on
//!   the host and shared over virtio-fs, writes
//!   `<root>/<base64url(target path)>/mountInfo.json` at NodePublish; the Kata
//!   runtime finds the record when the pod's container mounts that target
//!   path, attaches the device to the VM and mounts it inside the guest.
//!   NodeUnpublish removes the record. The filesystem is then never mounted
//!   on the host while the guest has it.
//! * **QMP hot-plug** (`qmp`, behind the feature of that name) for a QEMU we talk to ourselves: `blockdev-add`
//!   of the file or device plus a raw node, `device_add virtio-blk-pci`, and
//!   the reverse once the guest released the device (`DEVICE_DELETED`).
//!
//! [`kata_shim`] talks to the shim of the Kata sandbox that holds a direct
//! volume (growing it in the guest, the guest's figures for it); [`probe`]
//! tells whether the host can run such VMs with KVM.

mod direct_volume;
pub mod kata_shim;
pub mod probe;
#[cfg(feature = "qmp")]
pub mod qmp;

pub use direct_volume::{DirectVolumes, Error, KATA_DIRECT_VOLUMES, MOUNT_INFO, MountInfo, metadata};
