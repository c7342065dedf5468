//! Handing host block devices and image files to VM sandboxes.
//!
//! Today: Kata Containers' **direct-volume** records ([`DirectVolumes`]). A CSI
//! driver that wants a volume to reach a Kata guest as virtio-blk, instead of
//! being mounted on the host and shared over virtio-fs, writes
//! `<root>/<base64url(target path)>/mountInfo.json` at NodePublish; the Kata
//! runtime finds the record when the pod's container mounts that target path,
//! attaches the device to the VM and mounts it inside the guest. NodeUnpublish
//! removes the record. The filesystem is then never mounted on the host while
//! the guest has it.

mod direct_volume;

pub use direct_volume::{DirectVolumes, Error, KATA_DIRECT_VOLUMES, MOUNT_INFO, MountInfo};
