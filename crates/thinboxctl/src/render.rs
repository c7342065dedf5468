//! Printing an [`Answer`]: aligned tables with binary size units for people,
//! one JSON document (see [`crate::model`]) for machines.

use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;

use crate::model::{ConsumerUsage, ContainerdGc, Device, HostReport, KeepReason, Orphan, PoolStatus, Report};
use crate::{Answer, EXIT_FINDINGS, EXIT_OK, Error};
use thinbox_containerd_gc::BackendKey;

/// How a command ended, short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Success; for `check`: nothing to clean.
    Ok,
    /// `check` found something to clean or a device whose storage is
    /// missing; `gc` failed to repair a device or orphan.
    Findings,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Ok => EXIT_OK,
            Outcome::Findings => EXIT_FINDINGS,
        }
    }
}

/// Prints `answer` on `out` (tables, or JSON with `json`). With `json`, the
/// verdict of `check` and warnings of `gc` go to `err`, so `out` stays one
/// JSON document.
pub fn render(answer: &Answer, json: bool, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, Error> {
    if json {
        writeln!(out, "{}", to_json(answer)?)?;
    } else {
        out.write_all(text(answer).as_bytes())?;
    }
    out.flush()?;
    let outcome = match answer {
        Answer::Check(r) if !r.clean => Outcome::Findings,
        Answer::Gc(r) if r.unrepaired() => Outcome::Findings,
        _ => Outcome::Ok,
    };
    if json {
        match answer {
            Answer::Check(r) if !r.clean => writeln!(err, "{}", summary(r, Tense::Would))?,
            Answer::Gc(r) if !r.missing.is_empty() || r.unrepaired() => writeln!(err, "{}", summary(r, Tense::Did))?,
            _ => {}
        }
    }
    Ok(outcome)
}

/// The `--json` document.
pub fn to_json(answer: &Answer) -> Result<String, serde_json::Error> {
    /// `devices` is an object, so fields can be added next to the list later.
    #[derive(Serialize)]
    struct DeviceList<'a> {
        devices: &'a [Device],
    }
    match answer {
        Answer::Status(s) => serde_json::to_string_pretty(s),
        Answer::Devices(d) => serde_json::to_string_pretty(&DeviceList { devices: d }),
        Answer::Check(r) | Answer::Gc(r) => serde_json::to_string_pretty(r),
        Answer::ContainerdGc(g) => serde_json::to_string_pretty(g),
        Answer::Host(h) => serde_json::to_string_pretty(h),
    }
}

/// The human-readable rendering.
pub fn text(answer: &Answer) -> String {
    match answer {
        Answer::Status(s) => status_text(s),
        Answer::Devices(d) => devices_text(d),
        Answer::Check(r) => report_text(r, Tense::Would),
        Answer::Gc(r) => report_text(r, Tense::Did),
        Answer::ContainerdGc(g) => containerd_gc_text(g),
        Answer::Host(h) => host_text(h),
    }
}

fn containerd_gc_text(g: &ContainerdGc) -> String {
    let mut rows = Vec::new();
    for s in &g.removed {
        let verb = if g.dry_run { "would remove" } else { "removed" };
        rows.push(vec![verb.to_owned(), s.key.clone(), s.kind.clone(), "containerd no longer lists it".to_owned()]);
    }
    for k in &g.kept {
        let why = match k.reason {
            KeepReason::Recent => format!("containerd does not list it, but it changed within --min-age ({} s)", g.min_age),
            KeepReason::UnknownNamespace => match BackendKey::parse(&k.key) {
                Some(b) => format!("containerd has no namespace {:?}", b.namespace),
                None => "containerd has no such namespace".to_owned(),
            },
            KeepReason::ParentOfKept => "containerd does not list it, but a snapshot that stays is its child".to_owned(),
        };
        rows.push(vec!["kept".to_owned(), k.key.clone(), k.kind.clone(), why]);
    }
    let mut line = match (g.removed.len(), g.dry_run) {
        (0, _) => format!("gc: nothing to remove; containerd lists {} of {} snapshot(s)", g.known, g.snapshots),
        (n, true) => format!("gc: would remove {n} of {} snapshot(s), which containerd no longer lists", g.snapshots),
        (n, false) => format!("gc: removed {n} of {} snapshot(s), which containerd no longer lists", g.snapshots),
    };
    if g.other > 0 {
        let _ = write!(line, "; {} not made by containerd, left alone", g.other);
    }
    if !g.kept.is_empty() {
        let _ = write!(line, "; kept {} it does not list (above)", g.kept.len());
    }
    if g.dry_run {
        line.push_str("; --dry-run: nothing removed");
    }
    table(&rows) + &line + "\n"
}

fn host_text(h: &HostReport) -> String {
    let k = &h.kvm;
    let verdict = match (&k.reason, k.usable) {
        (None, true) => "usable".to_owned(),
        (Some(reason), _) => format!("not usable: {reason}"),
        (None, false) => "not usable".to_owned(),
    };
    let vcpus = match (k.recommended_vcpus, k.max_vcpus) {
        (Some(rec), Some(max)) => format!("{rec} recommended, {max} max per VM"),
        _ => "-".to_owned(),
    };
    let mut rows = vec![
        vec!["kvm".to_owned(), verdict],
        vec!["api version".to_owned(), or_dash(k.api_version.map(|v| v.to_string()))],
        vec!["vcpus".to_owned(), vcpus],
    ];
    if k.usable {
        // The probe stops at ioctls; say so where someone reads "usable".
        rows.push(vec!["note".to_owned(), "from KVM's ioctls, not a guest boot (a PVM host passes them yet QEMU's guests fail)".to_owned()]);
    }
    table(&rows)
}

/// Binary units, at most one decimal: `512MiB`, `65.1MiB`, `0B`. (Unlike
/// the config's exact notation, `66632KiB` reads poorly in a table.)
fn size(n: u64) -> String {
    const UNITS: [(&str, u64); 5] = [("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    match UNITS.iter().find(|(_, unit)| n >= *unit) {
        Some((name, unit)) if n % unit == 0 => format!("{}{name}", n / unit),
        Some((name, unit)) => format!("{:.1}{name}", n as f64 / *unit as f64),
        None => format!("{n}B"),
    }
}

/// `part` as a whole percentage of `whole`.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 { String::new() } else { format!(" ({}%)", (part as f64 * 100.0 / whole as f64).round()) }
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".to_owned())
}

fn status_text(s: &PoolStatus) -> String {
    let mut rows = vec![
        vec!["backend".to_owned(), s.backend.clone()],
        vec!["location".to_owned(), s.location.clone()],
        vec!["data".to_owned(), format!("{} used{}, {} free, {} total", size(s.used), percent(s.used, s.total), size(s.free), size(s.total))],
        vec!["reserve".to_owned(), size(s.reserve)],
    ];
    if s.free < s.reserve {
        rows.push(vec!["warning".to_owned(), "free space is below the reserve: new snapshots and volumes are refused".to_owned()]);
    }
    if s.unattached > 0 {
        rows.push(vec![
            "warning".to_owned(),
            format!("{} device(s) in use are not attached: their snapshots and volumes cannot be used; `thinboxctl gc` says why", s.unattached),
        ]);
    }
    rows.extend([
        vec![
            "metadata".to_owned(),
            or_dash(s.metadata.map(|m| format!("{} used{}, {} total", size(m.used), percent(m.used, m.total), size(m.total)))),
        ],
        vec!["low water".to_owned(), or_dash(s.low_water.map(size))],
        vec!["mode".to_owned(), or_dash(s.mode.clone())],
        vec!["devices".to_owned(), device_count(s)],
    ]);
    table(&rows) + &consumers_text(&s.consumers)
}

/// The device count, with those removed but not yet deleted and those in use
/// but not attached.
fn device_count(s: &PoolStatus) -> String {
    let parts: Vec<String> = [(s.deleting, "deleting"), (s.unattached, "not attached")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if parts.is_empty() { s.devices.to_string() } else { format!("{} ({})", s.devices, parts.join(", ")) }
}

/// `status`'s breakdown, after a blank line: devices and bytes per consumer;
/// volumes outside the pool (the dir kind) in a column of their own,
/// shown only when there are any.
fn consumers_text(consumers: &[ConsumerUsage]) -> String {
    if consumers.is_empty() {
        return String::new();
    }
    let outside = consumers.iter().any(|c| c.outside_pool_volumes > 0);
    let mut header = vec!["CONSUMER".to_owned(), "DEVICES".to_owned(), "USED".to_owned()];
    if outside {
        header.push("OUTSIDE THE POOL".to_owned());
    }
    let mut rows = vec![header];
    let mut notes = String::new();
    for c in consumers {
        let name = or_dash(c.consumer.clone());
        let mut row = vec![name.clone(), c.devices.to_string(), size(c.bytes)];
        if outside {
            row.push(match c.outside_pool_volumes {
                0 => "-".to_owned(),
                n => format!("{n} volume(s), {}", size(c.outside_pool_bytes)),
            });
        }
        rows.push(row);
        if c.unreadable > 0 {
            let _ = writeln!(notes, "{name}: the usage of {} device(s) or volume(s) could not be read and is not counted", c.unreadable);
        }
    }
    "\n".to_owned() + &table(&rows) + &notes
}

fn devices_text(devices: &[Device]) -> String {
    if devices.is_empty() {
        return "no devices\n".to_owned();
    }
    let mut rows = vec![["ID", "STATE", "ACCESS", "NODE", "FS", "SIZE", "USAGE", "ORIGIN", "CONSUMER", "OWNERS"].map(str::to_owned).to_vec()];
    let mut notes = String::new();
    for d in devices {
        let usage = match (d.usage, &d.usage_error) {
            (Some(u), _) => size(u),
            (None, Some(e)) => {
                let _ = writeln!(notes, "device {}: usage unavailable: {e}", d.id);
                "?".to_owned()
            }
            (None, None) => "-".to_owned(),
        };
        rows.push(vec![
            d.id.to_string(),
            d.state.clone(),
            or_dash(d.access.clone()),
            or_dash(d.node.clone()),
            d.fs.clone(),
            size(d.size),
            usage,
            or_dash(d.origin.map(|o| o.to_string())),
            or_dash(d.consumer.clone()),
            // A device is one record's: snapshot keys or CSI ids, not both.
            match d.snapshots.iter().chain(&d.volumes).map(String::as_str).collect::<Vec<_>>() {
                owners if owners.is_empty() => "-".to_owned(),
                owners => owners.join(", "),
            },
        ]);
    }
    table(&rows) + &notes
}

/// `check` says what would happen, `gc` what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tense {
    Would,
    Did,
}

fn report_text(r: &Report, tense: Tense) -> String {
    let verb = |would: &str, did: &str| match tense {
        Tense::Would => format!("would {would}"),
        Tense::Did => did.to_owned(),
    };
    let mut rows = Vec::new();
    for id in &r.devices_removed {
        rows.push(vec![verb("remove", "removed"), format!("device {id}"), "half-made, half-deleted, or no snapshot or volume uses it".to_owned()]);
    }
    for o in &r.orphans {
        rows.push(vec![verb("remove", "removed"), orphan_name(o), "not in the store".to_owned()]);
    }
    for id in &r.reattached {
        rows.push(vec![verb("re-attach", "re-attached"), format!("device {id}"), "active, but not attached".to_owned()]);
    }
    for id in &r.detached {
        rows.push(vec![verb("detach", "detached"), format!("device {id}"), "inactive, but still attached".to_owned()]);
    }
    for id in &r.missing {
        rows.push(vec!["MISSING".to_owned(), format!("device {id}"), "a snapshot or volume uses it, but its storage is gone".to_owned()]);
    }
    for f in &r.failed {
        rows.push(vec!["FAILED".to_owned(), format!("device {}", f.device), format!("{}: {}", f.repair, f.error)]);
    }
    for f in &r.orphans_failed {
        rows.push(vec!["FAILED".to_owned(), orphan_name(&f.orphan), format!("remove: {}", f.error)]);
    }
    for id in &r.held {
        rows.push(vec!["held".to_owned(), format!("device {id}"), "removed, but still open (a VMM holding it): deleted once let go".to_owned()]);
    }
    for o in &r.orphans_held {
        rows.push(vec!["held".to_owned(), orphan_name(o), "not in the store, but still open: removed once let go".to_owned()]);
    }
    table(&rows) + &summary(r, tense) + "\n"
}

/// One line: the verdict of `check`, or what `gc` did.
fn summary(r: &Report, tense: Tense) -> String {
    let fixable = r.devices_removed.len() + r.orphans.len() + r.reattached.len() + r.detached.len();
    let missing = if r.missing.is_empty() {
        String::new()
    } else {
        format!(
            "; {} device(s) with missing storage: gc cannot repair them, remove the snapshots or volumes that use them ({})",
            r.missing.len(),
            ids(&r.missing)
        )
    };
    let devices: Vec<u64> = r.failed.iter().map(|f| f.device).collect();
    let unrepaired: Vec<String> = [
        (!devices.is_empty()).then(|| format!("{} device(s) ({})", devices.len(), ids(&devices))),
        (!r.orphans_failed.is_empty()).then(|| {
            let names: Vec<String> = r.orphans_failed.iter().map(|f| orphan_name(&f.orphan)).collect();
            format!("{} orphan(s) ({})", names.len(), names.join(", "))
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    let failed = if unrepaired.is_empty() {
        String::new()
    } else {
        format!("; {} could not be repaired and were left as they were: see the errors above", unrepaired.join(" and "))
    };
    let open = r.held.len() + r.orphans_held.len();
    let held = if open == 0 { String::new() } else { format!("; {open} still open, the daemon removes them once let go") };
    let missing = missing + &failed + &held;
    match tense {
        Tense::Would if r.is_clean() && open == 0 => "check: the pool matches the store; nothing to clean".to_owned(),
        Tense::Would if fixable == 0 => format!("check: nothing for gc to clean{missing}"),
        Tense::Would => format!("check: {fixable} finding(s); `thinboxctl gc` cleans them up{missing}"),
        Tense::Did if r.is_clean() && open == 0 => "gc: nothing to clean".to_owned(),
        Tense::Did => format!("gc: cleaned up {fixable} finding(s){missing}"),
    }
}

/// "loop device /dev/loop9", "file /p/devices/9.img", …
fn orphan_name(o: &Orphan) -> String {
    let kind = match o.kind.as_str() {
        "loop" => "loop device",
        "dm_device" => "dm device",
        "thin_id" => "thin id",
        other => other,
    };
    format!("{kind} {}", o.what)
}

fn ids(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// Left-aligned columns two spaces apart; the last column is not padded, so
/// lines carry no trailing blanks.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (c, cell) in row.iter().enumerate() {
            if c == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Space;

    fn reflink_status() -> PoolStatus {
        PoolStatus {
            backend: "reflink".into(),
            location: "/var/lib/thinbox/pool/devices".into(),
            total: 64 << 30,
            used: 16 << 30,
            free: 48 << 30,
            reserve: 512 << 20,
            devices: 3,
            deleting: 0,
            unattached: 0,
            metadata: None,
            low_water: None,
            mode: None,
            consumers: vec![
                consumer(Some("image_layer"), 1, 428 << 10),
                consumer(Some("container_rootfs"), 1, 4 << 20),
                consumer(Some("volume"), 1, 8_493_465),
                consumer(Some("emptydir"), 0, 0),
            ],
        }
    }

    fn consumer(name: Option<&str>, devices: u64, bytes: u64) -> ConsumerUsage {
        ConsumerUsage { consumer: name.map(str::to_owned), devices, bytes, unreadable: 0, outside_pool_volumes: 0, outside_pool_bytes: 0 }
    }

    fn device(id: u64, access: Option<&str>, node: Option<&str>, usage: Option<u64>, keys: &[&str]) -> Device {
        Device {
            id,
            size: 512 << 20,
            origin: (id > 1).then_some(1),
            fs: "ext4".into(),
            state: "ready".into(),
            access: access.map(str::to_owned),
            node: node.map(str::to_owned),
            usage,
            inodes: usage.map(|_| 4),
            usage_error: None,
            consumer: (!keys.is_empty()).then(|| if access == Some("rw") { "container_rootfs" } else { "image_layer" }.to_owned()),
            snapshots: keys.iter().map(|k| k.to_string()).collect(),
            volumes: vec![],
        }
    }

    /// A CSI volume's device.
    fn volume(id: u64, node: &str, usage: u64, consumer: &str, volume_id: &str) -> Device {
        Device {
            origin: None,
            consumer: Some(consumer.to_owned()),
            snapshots: vec![],
            volumes: vec![volume_id.to_owned()],
            ..device(id, Some("rw"), Some(node), Some(usage), &[])
        }
    }

    fn report(removed: &[u64], orphans: &[&str], missing: &[u64]) -> Report {
        let mut r = Report {
            clean: false,
            devices_removed: removed.to_vec(),
            orphans: orphans.iter().map(|p| Orphan { kind: "file".into(), what: p.to_string() }).collect(),
            missing: missing.to_vec(),
            ..Report::default()
        };
        r.clean = r.is_clean();
        r
    }

    fn run(answer: &Answer, json: bool) -> (Outcome, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let outcome = render(answer, json, &mut out, &mut err).expect("renders");
        (outcome, String::from_utf8(out).expect("utf-8"), String::from_utf8(err).expect("utf-8"))
    }

    #[test]
    fn sizes_are_short() {
        let cases =
            [(0, "0B"), (1000, "1000B"), (4096, "4KiB"), (68_231_168, "65.1MiB"), (512 << 20, "512MiB"), (4032 << 20, "3.9GiB"), (3 << 40, "3TiB")];
        for (n, s) in cases {
            assert_eq!(size(n), s);
        }
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let t = table(&[vec!["a".into(), "bbb".into(), "c".into()], vec!["dddd".into(), "e".into(), "ffffff".into()]]);
        assert_eq!(t, "a     bbb  c\ndddd  e    ffffff\n");
        assert_eq!(table(&[]), "");
    }

    #[test]
    fn status_shows_human_sizes_and_dashes_for_what_the_backend_lacks() {
        let (outcome, out, err) = run(&Answer::Status(reflink_status()), false);
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(
            out,
            "backend    reflink\n\
             location   /var/lib/thinbox/pool/devices\n\
             data       16GiB used (25%), 48GiB free, 64GiB total\n\
             reserve    512MiB\n\
             metadata   -\n\
             low water  -\n\
             mode       -\n\
             devices    3\n\
             \n\
             CONSUMER          DEVICES  USED\n\
             image_layer       1        428KiB\n\
             container_rootfs  1        4MiB\n\
             volume            1        8.1MiB\n\
             emptydir          0        0B\n"
        );
        assert!(err.is_empty());

        let thin = PoolStatus {
            backend: "dm-thin".into(),
            free: 100 << 20,
            used: (64 << 30) - (100 << 20),
            metadata: Some(Space { total: 128 << 20, used: 12 << 20 }),
            low_water: Some(1 << 30),
            mode: Some("rw".into()),
            ..reflink_status()
        };
        let out = text(&Answer::Status(thin));
        assert!(out.contains("warning    free space is below the reserve"), "{out}");
        assert!(out.contains("metadata   12MiB used (9%), 128MiB total\n"), "{out}");
        assert!(out.contains("low water  1GiB\n") && out.contains("mode       rw\n"), "{out}");

        let none = PoolStatus { consumers: vec![], ..reflink_status() };
        assert!(text(&Answer::Status(none)).ends_with("devices    3\n"), "an older daemon sends no breakdown");

        let held = PoolStatus { deleting: 1, consumers: vec![], ..reflink_status() };
        assert!(text(&Answer::Status(held)).ends_with("devices    3 (1 deleting)\n"), "removed, not yet deleted");
        let stuck = PoolStatus { deleting: 1, unattached: 2, consumers: vec![], ..reflink_status() };
        let out = text(&Answer::Status(stuck));
        assert!(out.ends_with("devices    3 (1 deleting, 2 not attached)\n"), "{out}");
        assert!(out.contains("warning    2 device(s) in use are not attached: "), "{out}");
    }

    #[test]
    fn status_shows_volumes_outside_the_pool_unnamed_devices_and_unreadable_usage() {
        let mut s = reflink_status();
        s.consumers[0].unreadable = 1;
        s.consumers[2].outside_pool_volumes = 2;
        s.consumers[2].outside_pool_bytes = 3 << 20;
        s.consumers[3].outside_pool_volumes = 1;
        s.consumers[3].outside_pool_bytes = 64 << 20;
        s.consumers.extend([consumer(Some("volume_snapshot"), 1, 0), consumer(None, 2, 1 << 20)]);
        let out = text(&Answer::Status(s));
        let breakdown = out.split_once("\n\n").expect("a blank line before the breakdown").1;
        assert_eq!(
            breakdown,
            "CONSUMER          DEVICES  USED    OUTSIDE THE POOL\n\
             image_layer       1        428KiB  -\n\
             container_rootfs  1        4MiB    -\n\
             volume            1        8.1MiB  2 volume(s), 3MiB\n\
             emptydir          0        0B      1 volume(s), 64MiB\n\
             volume_snapshot   1        0B      -\n\
             -                 2        1MiB    -\n\
             image_layer: the usage of 1 device(s) or volume(s) could not be read and is not counted\n"
        );
    }

    #[test]
    fn devices_table_lists_state_node_usage_consumer_and_owners() {
        let mut broken = device(4, None, None, None, &[]);
        broken.state = "deleting".into();
        broken.usage_error = Some("open /p/devices/4.img: No such file or directory".into());
        let devices = vec![
            device(1, None, None, Some(8 << 20), &["base"]),
            device(2, Some("rw"), Some("/dev/loop12"), Some(4_404_019), &["default/3/ctr"]),
            device(3, Some("ro"), Some("/dev/loop13"), Some(0), &["v1", "v2"]),
            broken,
            volume(5, "/dev/loop14", 8_493_465, "volume", "tb-block-1"),
            volume(6, "/dev/loop15", 12 << 10, "volume_snapshot", "tb-snap-1"),
        ];
        let (outcome, out, _) = run(&Answer::Devices(devices), false);
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(
            out,
            "ID  STATE     ACCESS  NODE         FS    SIZE    USAGE   ORIGIN  CONSUMER          OWNERS\n\
             1   ready     -       -            ext4  512MiB  8MiB    -       image_layer       base\n\
             2   ready     rw      /dev/loop12  ext4  512MiB  4.2MiB  1       container_rootfs  default/3/ctr\n\
             3   ready     ro      /dev/loop13  ext4  512MiB  0B      1       image_layer       v1, v2\n\
             4   deleting  -       -            ext4  512MiB  ?       1       -                 -\n\
             5   ready     rw      /dev/loop14  ext4  512MiB  8.1MiB  -       volume            tb-block-1\n\
             6   ready     rw      /dev/loop15  ext4  512MiB  12KiB   -       volume_snapshot   tb-snap-1\n\
             device 4: usage unavailable: open /p/devices/4.img: No such file or directory\n"
        );
        assert_eq!(text(&Answer::Devices(vec![])), "no devices\n");
    }

    #[test]
    fn json_has_stable_field_names_and_nulls() {
        let devices = vec![device(2, Some("rw"), Some("/dev/loop12"), Some(4096), &["k"]), volume(3, "/dev/loop13", 8192, "emptydir", "tb-file-1")];
        let (_, out, err) = run(&Answer::Devices(devices), true);
        assert!(err.is_empty());
        let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
        assert_eq!(
            v,
            serde_json::json!({"devices": [{
                "id": 2, "size": 512 << 20, "origin": 1, "fs": "ext4", "state": "ready", "access": "rw",
                "node": "/dev/loop12", "usage": 4096, "inodes": 4, "usage_error": null,
                "consumer": "container_rootfs", "snapshots": ["k"], "volumes": []
            }, {
                "id": 3, "size": 512 << 20, "origin": null, "fs": "ext4", "state": "ready", "access": "rw",
                "node": "/dev/loop13", "usage": 8192, "inodes": 4, "usage_error": null,
                "consumer": "emptydir", "snapshots": [], "volumes": ["tb-file-1"]
            }]})
        );
        let unnamed = Device { consumer: None, snapshots: vec![], ..device(4, None, None, None, &[]) };
        let v: serde_json::Value = serde_json::from_str(&to_json(&Answer::Devices(vec![unnamed])).expect("encodes")).expect("parses");
        assert_eq!((&v["devices"][0]["consumer"], &v["devices"][0]["snapshots"]), (&serde_json::Value::Null, &serde_json::json!([])));

        let v: serde_json::Value = serde_json::from_str(&to_json(&Answer::Status(reflink_status())).expect("encodes")).expect("parses");
        assert_eq!(
            v,
            serde_json::json!({
                "backend": "reflink", "location": "/var/lib/thinbox/pool/devices", "total": 64u64 << 30, "used": 16u64 << 30,
                "free": 48u64 << 30, "reserve": 512 << 20, "devices": 3, "deleting": 0, "unattached": 0, "metadata": null, "low_water": null, "mode": null,
                "consumers": [
                    {"consumer": "image_layer", "devices": 1, "bytes": 428 << 10, "unreadable": 0, "outside_pool_volumes": 0, "outside_pool_bytes": 0},
                    {"consumer": "container_rootfs", "devices": 1, "bytes": 4 << 20, "unreadable": 0, "outside_pool_volumes": 0, "outside_pool_bytes": 0},
                    {"consumer": "volume", "devices": 1, "bytes": 8_493_465, "unreadable": 0, "outside_pool_volumes": 0, "outside_pool_bytes": 0},
                    {"consumer": "emptydir", "devices": 0, "bytes": 0, "unreadable": 0, "outside_pool_volumes": 0, "outside_pool_bytes": 0}
                ]
            })
        );
        let unnamed = PoolStatus { consumers: vec![consumer(None, 2, 7)], ..reflink_status() };
        let v: serde_json::Value = serde_json::from_str(&to_json(&Answer::Status(unnamed)).expect("encodes")).expect("parses");
        assert_eq!(v["consumers"][0]["consumer"], serde_json::Value::Null, "devices no record names");
    }

    #[test]
    fn check_exits_1_on_findings_and_keeps_stdout_pure_json() {
        let clean = report(&[], &[], &[]);
        let (outcome, out, _) = run(&Answer::Check(clean.clone()), false);
        assert_eq!((outcome, out.as_str()), (Outcome::Ok, "check: the pool matches the store; nothing to clean\n"));
        assert_eq!(outcome.exit_code(), 0);

        let dirty = report(&[7], &["/p/devices/999.img"], &[]);
        let (outcome, out, _) = run(&Answer::Check(dirty.clone()), false);
        assert_eq!(outcome.exit_code(), 1);
        assert_eq!(
            out,
            "would remove  device 7                 half-made, half-deleted, or no snapshot or volume uses it\n\
             would remove  file /p/devices/999.img  not in the store\n\
             check: 2 finding(s); `thinboxctl gc` cleans them up\n"
        );

        let (outcome, out, err) = run(&Answer::Check(dirty), true);
        assert_eq!(outcome, Outcome::Findings);
        let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is only JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "clean": false, "devices_removed": [7], "reattached": [], "detached": [],
                "orphans": [{"kind": "file", "what": "/p/devices/999.img"}], "missing": [], "failed": [], "orphans_failed": [],
                "held": [], "orphans_held": []
            })
        );
        assert_eq!(err, "check: 2 finding(s); `thinboxctl gc` cleans them up\n");

        let (outcome, out, _) = run(&Answer::Check(report(&[], &[], &[5])), false);
        assert_eq!(outcome, Outcome::Findings, "a missing device is a finding although gc cannot fix it");
        assert!(out.contains("MISSING  device 5") && out.contains("check: nothing for gc to clean; 1 device(s) with missing storage"), "{out}");
    }

    #[test]
    fn gc_exits_1_when_it_left_a_device_it_could_not_repair() {
        use crate::model::{Failure, OrphanFailure};
        let (outcome, out, _) = run(&Answer::Gc(report(&[7], &[], &[])), false);
        assert_eq!((outcome, out.lines().last()), (Outcome::Ok, Some("gc: cleaned up 1 finding(s)")));

        let mut r = report(&[7], &[], &[]);
        r.failed = vec![Failure { device: 3, repair: "reattach".into(), error: "open /p/devices/3.img: EPERM".into() }];
        r.clean = r.is_clean();
        assert!(!r.clean);
        let (outcome, out, _) = run(&Answer::Gc(r.clone()), false);
        assert_eq!(outcome.exit_code(), 1);
        assert_eq!(
            out,
            "removed  device 7  half-made, half-deleted, or no snapshot or volume uses it\n\
             FAILED   device 3  reattach: open /p/devices/3.img: EPERM\n\
             gc: cleaned up 1 finding(s); 1 device(s) (3) could not be repaired and were left as they were: see the errors above\n"
        );
        let (outcome, out, err) = run(&Answer::Gc(r), true);
        assert_eq!(outcome, Outcome::Findings);
        let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is only JSON");
        assert_eq!(v["failed"], serde_json::json!([{"device": 3, "repair": "reattach", "error": "open /p/devices/3.img: EPERM"}]));
        assert!(err.contains("1 device(s) (3) could not be repaired"), "the verdict goes to stderr: {err}");

        let mut r = report(&[], &[], &[]);
        let orphan = Orphan { kind: "file".into(), what: "/p/devices/9.img".into() };
        r.orphans_failed = vec![OrphanFailure { orphan, error: "remove /p/devices/9.img: EPERM".into() }];
        r.clean = r.is_clean();
        let (outcome, out, _) = run(&Answer::Gc(r.clone()), false);
        assert_eq!(outcome.exit_code(), 1);
        assert_eq!(
            out,
            "FAILED  file /p/devices/9.img  remove: remove /p/devices/9.img: EPERM\n\
             gc: cleaned up 0 finding(s); 1 orphan(s) (file /p/devices/9.img) could not be repaired and were left as they were: see the errors above\n"
        );
        let (_, out, _) = run(&Answer::Gc(r), true);
        let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is only JSON");
        assert_eq!(v["orphans_failed"], serde_json::json!([{"kind": "file", "what": "/p/devices/9.img", "error": "remove /p/devices/9.img: EPERM"}]));
    }

    /// A removed device or an orphan still open is nothing for gc to do: it
    /// is shown, with why it is still there, and changes no exit code.
    #[test]
    fn devices_and_orphans_still_open_are_shown_but_are_no_finding() {
        let mut r = report(&[], &[], &[]);
        r.held = vec![6];
        r.orphans_held = vec![Orphan { kind: "thin_id".into(), what: "10".into() }];
        r.clean = r.is_clean();
        let (outcome, out, _) = run(&Answer::Check(r.clone()), false);
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(
            out,
            "held  device 6    removed, but still open (a VMM holding it): deleted once let go\n\
             held  thin id 10  not in the store, but still open: removed once let go\n\
             check: nothing for gc to clean; 2 still open, the daemon removes them once let go\n"
        );
        let (outcome, out, _) = run(&Answer::Gc(r.clone()), false);
        assert_eq!(outcome, Outcome::Ok);
        assert!(out.ends_with("gc: cleaned up 0 finding(s); 2 still open, the daemon removes them once let go\n"), "{out}");
        let (_, out, err) = run(&Answer::Gc(r), true);
        let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is only JSON");
        assert_eq!((&v["held"], &v["orphans_held"]), (&serde_json::json!([6]), &serde_json::json!([{"kind": "thin_id", "what": "10"}])));
        assert_eq!(err, "", "nothing to say on stderr");
    }

    #[test]
    fn host_shows_kvm_or_why_not() {
        use crate::model::KvmProbe;
        let usable =
            HostReport { kvm: KvmProbe { usable: true, api_version: Some(12), max_vcpus: Some(1024), recommended_vcpus: Some(2), reason: None } };
        let (outcome, out, _) = run(&Answer::Host(usable.clone()), false);
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(
            out,
            "kvm          usable\n\
             api version  12\n\
             vcpus        2 recommended, 1024 max per VM\n\
             note         from KVM's ioctls, not a guest boot (a PVM host passes them yet QEMU's guests fail)\n"
        );
        let missing = HostReport {
            kvm: KvmProbe {
                usable: false,
                api_version: None,
                max_vcpus: None,
                recommended_vcpus: None,
                reason: Some("open /dev/kvm: No such file or directory (os error 2)".into()),
            },
        };
        let (outcome, out, _) = run(&Answer::Host(missing), false);
        assert_eq!(outcome, Outcome::Ok, "no KVM is an answer, not a failure");
        assert_eq!(out, "kvm          not usable: open /dev/kvm: No such file or directory (os error 2)\napi version  -\nvcpus        -\n");
        let (_, out, err) = run(&Answer::Host(usable), true);
        assert!(err.is_empty());
        let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
        assert_eq!(v, serde_json::json!({"kvm": {"usable": true, "api_version": 12, "max_vcpus": 1024, "recommended_vcpus": 2, "reason": null}}));
    }

    fn containerd_gc(dry_run: bool) -> ContainerdGc {
        use crate::model::{GcSnapshot, KeptSnapshot};
        ContainerdGc {
            dry_run,
            min_age: 600,
            snapshotters: vec!["thinbox".into()],
            namespaces: vec!["default".into(), "k8s.io".into()],
            snapshots: 7,
            known: 2,
            other: 1,
            removed: vec![
                GcSnapshot { key: "default/4/sha256:b".into(), kind: "committed".into(), parent: Some("default/2/sha256:a".into()) },
                GcSnapshot { key: "default/2/sha256:a".into(), kind: "committed".into(), parent: None },
            ],
            kept: vec![
                KeptSnapshot { key: "gone/1/x".into(), kind: "active".into(), reason: KeepReason::UnknownNamespace },
                KeptSnapshot { key: "k8s.io/9/c".into(), kind: "active".into(), reason: KeepReason::Recent },
            ],
        }
    }

    #[test]
    fn containerd_gc_lists_removals_in_order_and_what_it_kept() {
        let (outcome, out, err) = run(&Answer::ContainerdGc(containerd_gc(false)), false);
        assert_eq!((outcome, err.as_str()), (Outcome::Ok, ""));
        assert_eq!(
            out,
            "removed  default/4/sha256:b  committed  containerd no longer lists it\n\
             removed  default/2/sha256:a  committed  containerd no longer lists it\n\
             kept     gone/1/x            active     containerd has no namespace \"gone\"\n\
             kept     k8s.io/9/c          active     containerd does not list it, but it changed within --min-age (600 s)\n\
             gc: removed 2 of 7 snapshot(s), which containerd no longer lists; 1 not made by containerd, left alone; \
             kept 2 it does not list (above)\n"
        );
        let out = text(&Answer::ContainerdGc(containerd_gc(true)));
        assert!(out.starts_with("would remove  default/4/sha256:b"), "{out}");
        assert!(out.ends_with("gc: would remove 2 of 7 snapshot(s), which containerd no longer lists; 1 not made by containerd, left alone; kept 2 it does not list (above); --dry-run: nothing removed\n"), "{out}");
        let none = ContainerdGc { removed: vec![], kept: vec![], other: 0, snapshots: 2, ..containerd_gc(false) };
        assert_eq!(text(&Answer::ContainerdGc(none)), "gc: nothing to remove; containerd lists 2 of 2 snapshot(s)\n");
    }

    #[test]
    fn containerd_gc_json_names_every_field() {
        let (_, out, err) = run(&Answer::ContainerdGc(containerd_gc(true)), true);
        assert!(err.is_empty());
        let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
        assert_eq!(
            v,
            serde_json::json!({
                "dry_run": true, "min_age": 600, "snapshotters": ["thinbox"], "namespaces": ["default", "k8s.io"],
                "snapshots": 7, "known": 2, "other": 1,
                "removed": [
                    {"key": "default/4/sha256:b", "kind": "committed", "parent": "default/2/sha256:a"},
                    {"key": "default/2/sha256:a", "kind": "committed", "parent": null}
                ],
                "kept": [
                    {"key": "gone/1/x", "kind": "active", "reason": "unknown_namespace"},
                    {"key": "k8s.io/9/c", "kind": "active", "reason": "recent"}
                ]
            })
        );
    }

    #[test]
    fn gc_reports_what_it_did_and_succeeds() {
        let (outcome, out, _) = run(&Answer::Gc(report(&[7], &["/p/devices/999.img"], &[])), false);
        assert_eq!(outcome, Outcome::Ok);
        assert!(out.starts_with("removed  device 7"), "{out}");
        assert!(out.ends_with("gc: cleaned up 2 finding(s)\n"), "{out}");
        assert_eq!(text(&Answer::Gc(report(&[], &[], &[]))), "gc: nothing to clean\n");
        let (outcome, _, err) = run(&Answer::Gc(report(&[], &[], &[5])), true);
        assert_eq!(outcome, Outcome::Ok);
        assert!(err.contains("gc cannot repair them"), "{err}");
    }
}
