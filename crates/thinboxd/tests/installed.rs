//! The Debian package, checked by the deploy tier (tests/deploy/package.sh);
//! no other tier runs this target.
//!
//! * `packaged_config_*`: deploy/host/thinboxd.toml, installed as
//!   /etc/thinbox/config.toml, is a valid config as it is (all defaults), and
//!   shows every key with its default value.
//! * `installed_daemon_serves_a_volume`: one CSI volume round trip against the
//!   installed thinboxd, which the script started from the installed unit's
//!   ExecStart with every state path under a temporary directory. It needs
//!   `THINBOX_CSI_SOCKET` (the daemon's CSI socket) and `THINBOX_CONFIG` (the
//!   file the daemon was started with: the installed config with its paths
//!   moved, whose `csi.kubelet_dir` holds the target), and fails without them.
//!   Needs root.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thinbox_proto::csi::v1::controller_client::ControllerClient;
use thinbox_proto::csi::v1::identity_client::IdentityClient;
use thinbox_proto::csi::v1::node_client::NodeClient;
use thinbox_proto::csi::v1::volume_capability::access_mode::Mode;
use thinbox_proto::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use thinbox_proto::csi::v1::*;
use thinboxd::Config;

const PACKAGED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/host/thinboxd.toml");

/// The packaged file with every `#key = value` line uncommented (explanations
/// are `# text`, with a space).
fn uncommented() -> String {
    let text = std::fs::read_to_string(PACKAGED_CONFIG).unwrap();
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(k) if k.starts_with(|c: char| c.is_ascii_lowercase()) => k,
            _ => l,
        })
        .fold(String::new(), |s, l| s + l + "\n")
}

/// Dotted paths of every key in a table.
fn keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let path = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => keys(t, &format!("{path}."), out),
            _ => {
                out.insert(path);
            }
        }
    }
}

#[test]
fn packaged_config_is_valid_as_it_is() {
    // What `thinboxd --config /etc/thinbox/config.toml` does first.
    let cfg = Config::load(Path::new(PACKAGED_CONFIG)).unwrap_or_else(|e| panic!("{PACKAGED_CONFIG}: {e}"));
    assert_eq!(cfg, Config::default(), "the packaged config sets nothing but the defaults");
}

#[test]
fn packaged_config_shows_every_key_with_its_default() {
    let text = uncommented();
    let mut cfg: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("uncommented {PACKAGED_CONFIG}: {e}"));
    // Every key, the unset ones included, is shown: serializing what was read
    // gives every key the struct has (an absent one would come back with its
    // default, and so show up here as missing from the file).
    let (mut shown, mut all) = (BTreeSet::new(), BTreeSet::new());
    keys(&toml::from_str(&text).unwrap(), "", &mut shown);
    keys(&toml::Table::try_from(&cfg).unwrap(), "", &mut all);
    assert_eq!(shown, all, "keys of {PACKAGED_CONFIG} vs thinboxd's Config");
    // The keys without a default show an example; every other one shows its default.
    for (key, example) in [
        ("metrics_address", cfg.metrics_address.take().is_some()),
        ("pool.dir", cfg.pool.dir.take().is_some()),
        ("pool.max_size", cfg.pool.max_size.take().is_some()),
        ("pool.thin.pool_name", cfg.pool.thin.pool_name.take().is_some()),
        ("pool.thin.metadata_device", cfg.pool.thin.metadata_device.take().is_some()),
        ("pool.thin.data_device", cfg.pool.thin.data_device.take().is_some()),
        ("pool.thin.discard_on_delete", cfg.pool.thin.discard_on_delete.take().is_some()),
        ("csi.node_id", cfg.csi.node_id.take().is_some()),
        ("csi.dir_path", cfg.csi.dir_path.take().is_some()),
    ] {
        assert!(example, "{key} has no default: {PACKAGED_CONFIG} should show an example, marked unset");
    }
    assert_eq!(cfg, Config::default(), "a value in {PACKAGED_CONFIG} is not the default");
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: this test runs against an installed thinboxd, from tests/deploy/package.sh"))
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
    }
}

fn is_mount_point(p: &Path) -> bool {
    thinbox_blockstore::mountinfo::mounts_under(p.parent().unwrap()).unwrap().iter().any(|m| m == p)
}

#[tokio::test]
async fn installed_daemon_serves_a_volume() {
    let socket = PathBuf::from(env("THINBOX_CSI_SOCKET"));
    let config = PathBuf::from(env("THINBOX_CONFIG"));
    let cfg = Config::load(&config).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    assert_eq!(cfg.csi.default_sandbox, thinbox_csi::state::Sandbox::Runc, "runc: the volume is mounted on the host");
    let ch = thinbox_proto::unix_channel(&socket, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    let (mut ident, mut ctl, mut node) = (IdentityClient::new(ch.clone()), ControllerClient::new(ch.clone()), NodeClient::new(ch));

    assert_eq!(ident.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
    assert_eq!(ident.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner().name, "csi.thinbox.io");

    let vol = ctl
        .create_volume(CreateVolumeRequest {
            name: "pvc-installed".into(),
            capacity_range: Some(CapacityRange { required_bytes: 512 << 20, limit_bytes: 0 }),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.capacity_bytes, 512 << 20);

    // Where kubelet would publish it: the parent is kubelet's, the target the driver's.
    let parent = cfg.csi.kubelet_dir.join("pods/pod-installed/volumes/kubernetes.io~csi/pvc-installed");
    std::fs::create_dir_all(&parent).unwrap();
    let target = parent.join("mount");
    let publish = NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    node.node_publish_volume(publish).await.unwrap();
    assert!(is_mount_point(&target), "{} is mounted", target.display());
    std::fs::write(target.join("hello"), "from the installed package").unwrap();
    assert_eq!(std::fs::read_to_string(target.join("hello")).unwrap(), "from the installed package");

    node.node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: vol.volume_id.clone(), target_path: target.display().to_string() })
        .await
        .unwrap();
    assert!(!target.exists(), "the driver removes its target");
    ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await.unwrap();
    assert!(ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty(), "no volume left");
}
