//! Host tier: `thinboxctl` against the real daemon (reflink backend, embedded
//! pool): status, devices, check and gc as an operator runs them, exit codes
//! included, with the snapshot socket alone and with both doors on one pool
//! (every consumer's share). Needs root.
//!
//! `thinboxctl` is another package, so cargo does not build its binary for this
//! test; the test builds it once with the same cargo, target directory and
//! profile as the daemon under test.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::node::Node;
use common::snapshots::*;
use serde_json::Value;

const CFG: &str = "[pool]\nbackend = \"reflink\"\nembedded_size = \"4GiB\"\nreserve = \"64MiB\"\n[snapshot]\ndefault_size = \"512MiB\"\n";

/// The `thinboxctl` binary next to the daemon's, built on first use.
fn thinboxctl() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile_dir = Path::new(env!("CARGO_BIN_EXE_thinboxd")).parent().unwrap();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "thinboxctl", "--bin", "thinboxctl", "--target-dir"]).arg(profile_dir.parent().unwrap());
        match profile_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            profile => {
                cmd.args(["--profile", profile]);
            }
        }
        assert!(cmd.status().unwrap().success(), "cargo build -p thinboxctl failed");
        profile_dir.join("thinboxctl")
    })
}

struct Ctl {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", self.stdout))
    }
}

/// Runs `thinboxctl --address SOCK ARGS...`.
fn ctl(socket: &Path, args: &[&str]) -> Ctl {
    let out = Command::new(thinboxctl()).arg("--address").arg(socket).args(args).env_remove("THINBOX_SOCKET").output().unwrap();
    let ctl = Ctl {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    // Shown with --nocapture: sample output for the docs.
    println!("$ thinboxctl {}\n{}{}(exit {})\n", args.join(" "), ctl.stdout, ctl.stderr, ctl.code);
    ctl
}

/// Unmounts on drop, so a failing assertion leaves no mount pinning a loop
/// device (declared after the daemon, it drops before it).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("umount").arg(&self.0).status();
        } else {
            umount(&self.0);
        }
    }
}

/// The device holding snapshot `key`.
fn device_of<'a>(devices: &'a [Value], key: &str) -> &'a Value {
    devices.iter().find(|d| d["snapshots"] == serde_json::json!([key])).unwrap_or_else(|| panic!("no device holds {key}: {devices:?}"))
}

#[tokio::test]
async fn thinboxctl_shows_the_pool_and_cleans_up_what_check_finds() {
    require_root();
    thinboxctl();
    let dir = tempfile::Builder::new().prefix("thinbox-admin-").tempdir().unwrap();
    let (d, mut c) = Daemon::start(dir.path(), Some(CFG), &[]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("hello", "world")]).await;
    let m = prepare(&mut c, "ctr", "base", HashMap::new()).await.unwrap();
    let mp = work.join("ctr");
    mount(&m, &mp);
    let mounted = Mounted(mp.clone());
    let mut f = std::fs::File::create(mp.join("data")).unwrap();
    f.write_all(&vec![7u8; 4 << 20]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let v = view(&mut c, "v", "base").await.unwrap();

    // status
    let st = ctl(&d.socket, &["--json", "status"]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    let st = st.json();
    assert_eq!(st["backend"], "reflink");
    assert_eq!(st["devices"], 3);
    assert_eq!(st["reserve"], 64 << 20);
    let (total, used, free) = (st["total"].as_u64().unwrap(), st["used"].as_u64().unwrap(), st["free"].as_u64().unwrap());
    assert!(total > 3 << 30 && free > 0 && used + free == total, "{st}");
    assert_eq!((&st["metadata"], &st["low_water"], &st["mode"]), (&Value::Null, &Value::Null, &Value::Null), "dm-thin only");
    let location = PathBuf::from(st["location"].as_str().unwrap());
    assert!(location.ends_with("pool/devices"), "{}", location.display());
    let human = ctl(&d.socket, &["status"]);
    assert_eq!(human.code, 0);
    assert!(human.stdout.contains("backend    reflink\n") && human.stdout.contains("devices    3\n"), "{}", human.stdout);

    // devices
    let devs = ctl(&d.socket, &["devices", "--json"]);
    assert_eq!(devs.code, 0, "{}", devs.stderr);
    let devs = devs.json()["devices"].as_array().unwrap().clone();
    assert_eq!(devs.len(), 3);
    let (base, ctr, view) = (device_of(&devs, "base"), device_of(&devs, "ctr"), device_of(&devs, "v"));
    for dev in [base, ctr, view] {
        assert_eq!((&dev["state"], &dev["fs"], &dev["usage_error"]), (&"ready".into(), &"ext4".into(), &Value::Null), "{dev}");
    }
    assert_eq!((&base["access"], &base["node"], &base["origin"]), (&Value::Null, &Value::Null, &Value::Null), "committed: detached");
    assert!(base["usage"].as_u64().unwrap() > 0, "{base}");
    assert_eq!((&ctr["access"], ctr["node"].as_str()), (&"rw".into(), Some(m[0].source.as_str())));
    assert_eq!(ctr["origin"], base["id"]);
    let usage = ctr["usage"].as_u64().unwrap();
    assert!(usage >= 4 << 20, "the mounted active snapshot wrote 4MiB, usage {usage}");
    assert_eq!((&view["access"], view["node"].as_str()), (&"ro".into(), Some(v[0].source.as_str())));
    assert_eq!(view["origin"], base["id"]);
    let human = ctl(&d.socket, &["devices"]);
    assert_eq!(human.code, 0);
    assert!(human.stdout.starts_with("ID  STATE  ACCESS  NODE"), "{}", human.stdout);
    assert!(human.stdout.lines().any(|l| l.contains(&m[0].source) && l.ends_with("  ctr")), "{}", human.stdout);
    drop(mounted);

    // check: clean
    let check = ctl(&d.socket, &["--json", "check"]);
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert_eq!(check.json()["clean"], true);

    // A leftover image file: check reports it, exits 1 and leaves it.
    let orphan = location.join("999.img");
    std::fs::write(&orphan, b"leftover").unwrap();
    let check = ctl(&d.socket, &["--json", "check"]);
    assert_eq!(check.code, 1, "check exits 1 when there is something to clean");
    let report = check.json();
    assert_eq!(report["clean"], false);
    assert_eq!(report["orphans"], serde_json::json!([{"kind": "file", "what": orphan.display().to_string()}]));
    assert_eq!(report["devices_removed"], serde_json::json!([]));
    assert!(check.stderr.contains("thinboxctl gc"), "the verdict goes to stderr with --json: {}", check.stderr);
    let human = ctl(&d.socket, &["check"]);
    assert_eq!(human.code, 1);
    assert!(human.stdout.contains(&format!("would remove  file {}", orphan.display())), "{}", human.stdout);
    assert!(orphan.exists(), "check changes nothing");

    // gc removes it; check is clean again; snapshots are untouched.
    let gc = ctl(&d.socket, &["--json", "gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert_eq!(gc.json()["orphans"], report["orphans"]);
    assert!(!orphan.exists(), "gc removed the orphan");
    let check = ctl(&d.socket, &["check"]);
    assert_eq!(check.code, 0);
    assert_eq!(check.stdout, "check: the pool matches the store; nothing to clean\n");
    assert_eq!(ctl(&d.socket, &["gc"]).stdout, "gc: nothing to clean\n");
    assert_eq!(ctl(&d.socket, &["--json", "devices"]).json()["devices"].as_array().unwrap().len(), 3);
    assert_eq!(read_through_view(&mut c, &work, "base", "hello").await, "world");
    d.release().await;
}

/// A device the daemon cannot repair at start (its loop went while the
/// daemon was down, and its image now refuses to open for writing) must not
/// stop the start: the daemon serves, re-attaches the other device that lost
/// its loop, refuses Mounts of the broken one (FAILED_PRECONDITION), counts
/// it as not attached (status, gauge), `check` says it would re-attach it,
/// `gc` reports it FAILED and exits 1, and once the cause is gone the daemon
/// repairs it by itself, with its data, before anyone runs `gc`.
#[tokio::test]
async fn a_device_the_daemon_cannot_repair_does_not_stop_its_start() {
    require_root();
    thinboxctl();
    let dir = tempfile::Builder::new().prefix("thinbox-admin-").tempdir().unwrap();
    let port = common::free_port();
    let (mut d, mut c) = Daemon::start_with_args(dir.path(), Some(CFG), &["--metrics-address", &format!("127.0.0.1:{port}")]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("hello", "world")]).await;
    let broken = prepare(&mut c, "broken", "base", HashMap::new()).await.unwrap();
    let other = prepare(&mut c, "other", "base", HashMap::new()).await.unwrap();
    let location = PathBuf::from(ctl(&d.socket, &["--json", "status"]).json()["location"].as_str().unwrap());
    let devs = ctl(&d.socket, &["--json", "devices"]).json()["devices"].as_array().unwrap().clone();
    let id = device_of(&devs, "broken")["id"].as_u64().unwrap();
    let image = location.join(format!("{id}.img"));

    assert!(d.stop().success());
    for node in [&broken[0].source, &other[0].source] {
        let out = Command::new("losetup").args(["-d", node]).output().unwrap();
        assert!(out.status.success(), "losetup -d {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let lock = common::Immutable::new(&image);
    let mut c = d.spawn(&[]).await;

    let mounts = |key: &str| thinbox_proto::snapshots::MountsRequest { snapshotter: String::new(), key: key.into() };
    let err = c.mounts(mounts("broken")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let m = c.mounts(mounts("other")).await.unwrap().into_inner().mounts;
    let mp = work.join("other");
    mount(&m, &mp);
    assert_eq!(std::fs::read_to_string(mp.join("hello")).unwrap(), "world", "the other device was re-attached at start");
    umount(&mp);
    let st = ctl(&d.socket, &["status"]);
    assert!(
        st.stdout.contains("devices    3 (1 not attached)\n") && st.stdout.contains("warning    1 device(s) in use are not attached"),
        "{}",
        st.stdout
    );
    assert_eq!(ctl(&d.socket, &["--json", "status"]).json()["unattached"], 1);
    let gauge = |n: u64| format!("\nthinbox_pool_unattached_devices {n}\n");
    let text = common::scrape(port).await;
    assert!(text.contains(&gauge(1)), "{text}");

    let check = ctl(&d.socket, &["--json", "check"]);
    assert_eq!(check.code, 1);
    assert_eq!(check.json()["reattached"], serde_json::json!([id]), "check would re-attach it");
    let gc = ctl(&d.socket, &["--json", "gc"]);
    assert_eq!(gc.code, 1, "gc exits 1 when it left a device it could not repair");
    let report = gc.json();
    assert_eq!((&report["clean"], &report["reattached"]), (&Value::Bool(false), &serde_json::json!([])));
    let failed = report["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report}");
    assert_eq!((&failed[0]["device"], &failed[0]["repair"]), (&serde_json::json!(id), &serde_json::json!("reattach")));
    assert!(failed[0]["error"].as_str().unwrap().contains(image.to_str().unwrap()), "the error names the image: {report}");
    assert!(gc.stderr.contains(&format!("1 device(s) ({id}) could not be repaired")), "{}", gc.stderr);
    let human = ctl(&d.socket, &["gc"]);
    assert_eq!(human.code, 1);
    assert!(human.stdout.contains(&format!("FAILED  device {id}  reattach: ")), "{}", human.stdout);

    // Once the cause is gone, the daemon repairs it by itself: its retries
    // back off from 1 s, and the start and both `gc` runs above failed.
    drop(lock);
    let healed = std::time::Instant::now();
    while ctl(&d.socket, &["--json", "status"]).json()["unattached"] != 0 {
        assert!(healed.elapsed() < std::time::Duration::from_secs(120), "not re-attached 120 s after its cause went");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    eprintln!("re-attached by the daemon {} ms after its cause went", healed.elapsed().as_millis());
    let gc = ctl(&d.socket, &["--json", "gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert_eq!(gc.json()["clean"], Value::Bool(true), "nothing left for gc: {}", gc.stdout);
    let m = c.mounts(mounts("broken")).await.unwrap().into_inner().mounts;
    let mp = work.join("broken");
    mount(&m, &mp);
    assert_eq!(std::fs::read_to_string(mp.join("hello")).unwrap(), "world");
    umount(&mp);
    assert_eq!(ctl(&d.socket, &["check"]).code, 0);
    assert_eq!(ctl(&d.socket, &["--json", "status"]).json()["unattached"], 0);
    assert!(common::scrape(port).await.contains(&gauge(0)));
    d.release().await;
}

/// Writes `bytes` to a new file at `path`, durably.
fn write(path: &Path, bytes: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&vec![7u8; bytes]).unwrap();
    f.sync_all().unwrap();
}

/// `devices --json`'s usage summed by consumer (`null`: no record names the device).
fn usage_by_consumer(socket: &Path) -> HashMap<Value, u64> {
    let mut sums = HashMap::new();
    for d in ctl(socket, &["--json", "devices"]).json()["devices"].as_array().unwrap() {
        *sums.entry(d["consumer"].clone()).or_default() += d["usage"].as_u64().unwrap();
    }
    sums
}

/// The row of the status table that `consumer` starts, split on blanks.
fn status_row(table: &str, consumer: &str) -> Vec<String> {
    let rows = table.split_once("\n\n").unwrap_or_else(|| panic!("no breakdown: {table}")).1;
    let row = rows.lines().find(|l| l.split_whitespace().next() == Some(consumer)).unwrap_or_else(|| panic!("no {consumer} row: {table}"));
    row.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_devices_show_each_consumer_of_a_pool_both_doors_share() {
    require_root();
    thinboxctl();
    let dir = tempfile::Builder::new().prefix("thinbox-admin-").tempdir().unwrap();
    let backend = std::env::var("THINBOX_TEST_BACKEND").unwrap_or_else(|_| "reflink".into());
    let mut n = Node::start(dir.path(), &format!("backend = \"{backend}\"\nembedded_size = \"4GiB\"\nreserve = \"64MiB\"")).await;
    let socket = n.snap_socket();
    let work = dir.path().join("work");

    // An image layer, a container rootfs on it, a volume and an emptyDir, each written to.
    layer(&mut n.snap, &work, "base", "", &[("hello", "world")]).await;
    let m = prepare(&mut n.snap, "ctr", "base", HashMap::new()).await.unwrap();
    let mp = work.join("ctr");
    mount(&m, &mp);
    let rootfs = Mounted(mp.clone());
    write(&mp.join("data"), 4 << 20);
    let vol = n.create("pvc-data", 256 << 20).await.unwrap();
    let vol_target = n.publish(&vol, "data").await;
    write(&vol_target.join("data"), 8 << 20);
    let handle = "csi-5e2f0c1e2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f9e";
    let scratch = n.publish_ephemeral(handle, "scratch", "128Mi").await;
    write(&scratch.join("data"), 8 << 20);

    // status: the four consumers, each with its device in the one pool.
    let st = ctl(&socket, &["--json", "status"]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    let st = st.json();
    assert_eq!(st["devices"], 4, "the layer's, the rootfs', the volume's and the emptyDir's: {st}");
    let consumers = st["consumers"].as_array().unwrap();
    let names: Vec<&str> = consumers.iter().map(|c| c["consumer"].as_str().unwrap()).collect();
    assert_eq!(names, ["image_layer", "container_rootfs", "volume", "emptydir"], "{st}");
    for (c, at_least) in consumers.iter().zip([1, 4 << 20, 8 << 20, 8 << 20]) {
        assert_eq!(
            (&c["devices"], &c["unreadable"], &c["outside_pool_volumes"], &c["outside_pool_bytes"]),
            (&1.into(), &0.into(), &0.into(), &0.into()),
            "{c}"
        );
        assert!(c["bytes"].as_u64().unwrap() >= at_least, "{c}");
    }
    // Each consumer's bytes are its devices' usage as `devices` reports it
    // (compared at a moment the usage holds still between two listings).
    for attempt in 0.. {
        let before = usage_by_consumer(&socket);
        let st = ctl(&socket, &["--json", "status"]).json();
        if before != usage_by_consumer(&socket) && attempt < 10 {
            continue;
        }
        for c in st["consumers"].as_array().unwrap() {
            assert_eq!(c["bytes"].as_u64(), before.get(&c["consumer"]).copied(), "{c} vs {before:?}");
        }
        break;
    }
    let human = ctl(&socket, &["status"]);
    assert_eq!(human.code, 0, "{}", human.stderr);
    // No volume lives outside the pool, so no column for them.
    assert!(human.stdout.contains("\n\nCONSUMER          DEVICES  USED\n"), "{}", human.stdout);
    for c in ["image_layer", "container_rootfs", "volume", "emptydir"] {
        let row = status_row(&human.stdout, c);
        assert_eq!((row.len(), row[1].as_str()), (3, "1"), "{row:?}");
    }

    // devices: each names its consumer and owner.
    let devs = ctl(&socket, &["--json", "devices"]);
    assert_eq!(devs.code, 0, "{}", devs.stderr);
    let devs = devs.json()["devices"].as_array().unwrap().clone();
    let scratch_id = devs.iter().find(|d| d["consumer"] == "emptydir").and_then(|d| d["volumes"][0].as_str()).unwrap().to_owned();
    assert!(scratch_id.starts_with("tb-file-"), "an inline volume is a file volume: {scratch_id}");
    let owners: Vec<(&Value, &Value, &Value)> = devs.iter().map(|d| (&d["consumer"], &d["snapshots"], &d["volumes"])).collect();
    let none = serde_json::json!([]);
    assert_eq!(
        owners,
        [
            (&"image_layer".into(), &serde_json::json!(["base"]), &none),
            (&"container_rootfs".into(), &serde_json::json!(["ctr"]), &none),
            (&"volume".into(), &none, &serde_json::json!([vol])),
            (&"emptydir".into(), &none, &serde_json::json!([scratch_id])),
        ],
        "in id order: {devs:?}"
    );
    let human = ctl(&socket, &["devices"]);
    assert_eq!(human.code, 0, "{}", human.stderr);
    assert!(human.stdout.starts_with("ID  STATE  ACCESS  NODE"), "{}", human.stdout);
    let tails: Vec<Vec<&str>> = human.stdout.lines().skip(1).map(|l| l.split_whitespace().rev().take(2).collect()).collect();
    assert_eq!(
        tails,
        [["base", "image_layer"], ["ctr", "container_rootfs"], [vol.as_str(), "volume"], [scratch_id.as_str(), "emptydir"]],
        "{}",
        human.stdout
    );

    // Both front ends' records count: nothing for gc to clean.
    let check = ctl(&socket, &["check"]);
    assert_eq!((check.code, check.stdout.as_str()), (0, "check: the pool matches the store; nothing to clean\n"));

    // The emptyDir goes with its publication.
    n.unpublish(handle, &scratch).await;
    let st = ctl(&socket, &["--json", "status"]).json();
    assert_eq!(st["consumers"][3]["devices"], 0, "{st}");
    n.unpublish(&vol, &vol_target).await;
    drop(rootfs);
    n.stop();
}

#[test]
fn an_unreachable_daemon_is_exit_code_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let out = ctl(&socket, &["status"]);
    assert_eq!(out.code, 2);
    assert!(out.stdout.is_empty());
    let expected = format!("thinboxctl: cannot reach thinboxd at {}: ", socket.display());
    assert!(out.stderr.starts_with(&expected), "{}", out.stderr);
}
