//! A QMP client for hot-plugging host block devices and image files into a
//! running QEMU as `virtio-blk-pci`.
//!
//! One [`Qmp`] owns one connection to QEMU's monitor socket. QMP interleaves
//! asynchronous events (`DEVICE_DELETED`, `BLOCK_JOB_*`, …) with command
//! responses on that connection; the client reads them while waiting for a
//! response and buffers them, so [`Qmp::unplug`] (or the caller, through
//! [`Qmp::wait_event`] and [`Qmp::take_events`]) sees events that arrived during
//! earlier commands.
//!
//! A disk is two block nodes and one device, all named after the disk id:
//! a protocol node `tbxf-<id>` (driver `file` for regular files, `host_device`
//! for block devices), a `raw` format node `tbxr-<id>` on top of it, and the
//! `virtio-blk-pci` device `<id>` whose drive is the raw node. The node-name
//! prefixes are how [`Qmp::disks`] tells our disks from everything else in
//! the VM. [`Qmp::hotplug`] adds nothing or all three: when a later step
//! fails, it deletes the nodes it added.
//!
//! Unplugging needs the guest: `device_del` only *asks* the guest to release
//! the device (PCIe attention button / ACPI), and QEMU emits `DEVICE_DELETED`
//! once it did. Only then can the block nodes go. A guest that never answers
//! (paused, hung, no hotplug driver) leaves the device plugged; [`Qmp::unplug`]
//! then fails with [`QmpError::Timeout`] and a later `unplug` of the same id
//! finishes the job if the event came in the meantime.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

/// Node-name prefix of the raw format node a device's drive points to.
pub const FORMAT_NODE_PREFIX: &str = "tbxr-";
/// Node-name prefix of the protocol node (`file` / `host_device`) under it.
pub const FILE_NODE_PREFIX: &str = "tbxf-";
/// QEMU keeps node names in a 32-byte buffer (31 characters); both prefixes
/// are 5 characters, so a disk id may have 26.
pub const MAX_ID_LEN: usize = 31 - FORMAT_NODE_PREFIX.len();
/// virtio-blk's serial is 20 bytes (VIRTIO_BLK_ID_BYTES); QEMU truncates longer ones silently.
pub const MAX_SERIAL_LEN: usize = 20;
/// How long [`Qmp::execute`] waits for QEMU's answer by default.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Events kept while nobody takes them; the oldest go first beyond this.
pub const EVENT_BUFFER: usize = 1024;

/// The raw format node of disk `id` (what `PluggedDisk::node` names).
pub fn format_node(id: &str) -> String {
    format!("{FORMAT_NODE_PREFIX}{id}")
}

/// The protocol node under the format node of disk `id`.
pub fn file_node(id: &str) -> String {
    format!("{FILE_NODE_PREFIX}{id}")
}

/// Broad classes of [`QmpError`], stable for callers that branch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpErrorKind {
    /// A disk description QEMU would refuse or misread; nothing was sent.
    InvalidArgument,
    /// The path or the disk id does not exist.
    NotFound,
    /// The socket failed or QEMU closed it.
    Io,
    /// QEMU said something that is not QMP as we know it.
    Protocol,
    /// QEMU answered a command with an error.
    Command,
    /// No answer or no event in time.
    Timeout,
}

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting, reading or writing the monitor socket failed.
    #[error("qmp {op} {}", socket.display())]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The monitor socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// QEMU closed the connection (it exited or another client took over).
    #[error("qmp {}: QEMU closed the connection", socket.display())]
    Closed {
        /// The monitor socket.
        socket: PathBuf,
    },
    /// A message that does not fit the protocol.
    #[error("qmp {}: {reason}", socket.display())]
    Protocol {
        /// The monitor socket.
        socket: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// QEMU refused a command. `class` is QMP's stable error class
    /// (`GenericError`, `DeviceNotFound`, …); `desc` is for humans only.
    #[error("qmp {command}: {desc} ({class})")]
    Command {
        /// The command QEMU refused.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// Nothing came in time: a command's answer, or `DEVICE_DELETED` from the guest.
    #[error("qmp {what}: nothing within {after:?}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// An id (disk, iothread, bus) QEMU would not accept.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidId {
        /// Which id.
        field: &'static str,
        /// The id.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// A serial virtio-blk cannot carry unchanged.
    #[error("invalid serial {serial:?}: {reason}")]
    InvalidSerial {
        /// The serial.
        serial: String,
        /// Why.
        reason: &'static str,
    },
    /// `aio=native` (Linux AIO) is only asynchronous with O_DIRECT; QEMU refuses it otherwise.
    #[error("disk {id}: aio=native needs cache_direct")]
    NativeAioWithoutDirect {
        /// The disk id.
        id: String,
    },
    /// A path QMP cannot carry unchanged, or QEMU would resolve elsewhere.
    #[error("invalid disk path {}: {reason}", path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The path cannot be looked at.
    #[error("disk path {}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("disk path {} is neither a regular file nor a block device", path.display())]
    NotFileOrBlockDevice {
        /// The path.
        path: PathBuf,
    },
    /// No disk of ours (device or block node) has this id.
    #[error("no hot-plugged disk {id}")]
    UnknownDisk {
        /// The id.
        id: String,
    },
}

impl QmpError {
    /// The broad class of this error.
    pub fn kind(&self) -> QmpErrorKind {
        match self {
            QmpError::Io { .. } | QmpError::Closed { .. } => QmpErrorKind::Io,
            QmpError::Protocol { .. } => QmpErrorKind::Protocol,
            QmpError::Command { .. } => QmpErrorKind::Command,
            QmpError::Timeout { .. } => QmpErrorKind::Timeout,
            QmpError::InvalidId { .. }
            | QmpError::InvalidSerial { .. }
            | QmpError::NativeAioWithoutDirect { .. }
            | QmpError::InvalidPath { .. }
            | QmpError::NotFileOrBlockDevice { .. } => QmpErrorKind::InvalidArgument,
            QmpError::Path { source, .. } if source.kind() == io::ErrorKind::NotFound => QmpErrorKind::NotFound,
            QmpError::Path { .. } => QmpErrorKind::InvalidArgument,
            QmpError::UnknownDisk { .. } => QmpErrorKind::NotFound,
        }
    }

    /// The QMP error class, when QEMU refused a command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// QEMU's asynchronous I/O engine for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    /// A thread pool doing blocking syscalls; works everywhere.
    Threads,
    /// Linux AIO; requires [`Disk::cache_direct`].
    Native,
    /// io_uring; needs a QEMU built with liburing and a kernel that allows it.
    IoUring,
}

impl Aio {
    /// The QAPI `BlockdevAioOptions` name.
    pub fn as_qapi(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::Native => "native",
            Aio::IoUring => "io_uring",
        }
    }
}

/// A host block device or image file to plug into a VM.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Device id; the block nodes are named after it. QEMU id syntax, at most [`MAX_ID_LEN`].
    pub id: String,
    /// A regular file (image) or a block device.
    pub path: PathBuf,
    /// The guest sees a read-only disk; QEMU opens the path read-only.
    pub read_only: bool,
    /// O_DIRECT on the host: no host page cache between guest and storage.
    pub cache_direct: bool,
    /// I/O engine.
    pub aio: Aio,
    /// An existing `-object iothread,id=…` to run the device's I/O in.
    pub iothread: Option<String>,
    /// The serial the guest sees (`/dev/disk/by-id/virtio-<serial>`), ASCII, at most 20 bytes.
    pub serial: Option<String>,
    /// The PCI(e) bus or root port to plug into; QEMU picks one when `None`
    /// (on q35 the root bus does not take hot-plugs: name a `pcie-root-port`).
    pub bus: Option<String>,
}

impl Disk {
    /// A disk with the common defaults: read-write, O_DIRECT, thread-pool I/O,
    /// no iothread, no serial, bus chosen by QEMU.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>) -> Disk {
        Disk { id: id.into(), path: path.into(), read_only: false, cache_direct: true, aio: Aio::Threads, iothread: None, serial: None, bus: None }
    }

    /// Checks everything that does not need the host or QEMU.
    pub fn validate(&self) -> Result<(), QmpError> {
        validate_id("disk id", &self.id, MAX_ID_LEN)?;
        if let Some(t) = &self.iothread {
            validate_id("iothread", t, usize::MAX)?;
        }
        if let Some(b) = &self.bus {
            validate_id("bus", b, usize::MAX)?;
        }
        if let Some(s) = &self.serial {
            validate_serial(s)?;
        }
        if self.aio == Aio::Native && !self.cache_direct {
            return Err(QmpError::NativeAioWithoutDirect { id: self.id.clone() });
        }
        let bad_path = |reason| Err(QmpError::InvalidPath { path: self.path.clone(), reason });
        if !self.path.is_absolute() {
            // QEMU would resolve it against its own working directory.
            return bad_path("not absolute");
        }
        if self.path.to_str().is_none() {
            // QMP is JSON: the name would reach QEMU changed.
            return bad_path("not UTF-8");
        }
        Ok(())
    }

    /// `blockdev-add` arguments of the protocol node; `block_device` picks
    /// `host_device` over `file`.
    pub fn file_node_args(&self, block_device: bool) -> Value {
        json!({
            "driver": if block_device { "host_device" } else { "file" },
            "node-name": file_node(&self.id),
            "filename": self.path.to_string_lossy(),
            "aio": self.aio.as_qapi(),
            "cache": { "direct": self.cache_direct, "no-flush": false },
            "read-only": self.read_only,
            // Guest discards reach the file (holes) or device (BLKDISCARD):
            // thin storage gets its space back.
            "discard": "unmap",
        })
    }

    /// `blockdev-add` arguments of the raw format node.
    pub fn format_node_args(&self) -> Value {
        json!({
            "driver": "raw",
            "node-name": format_node(&self.id),
            "file": file_node(&self.id),
            "cache": { "direct": self.cache_direct, "no-flush": false },
            "read-only": self.read_only,
            "discard": "unmap",
        })
    }

    /// `device_add` arguments of the virtio-blk-pci device.
    pub fn device_args(&self) -> Value {
        let mut args = Map::new();
        args.insert("driver".into(), "virtio-blk-pci".into());
        args.insert("id".into(), self.id.clone().into());
        args.insert("drive".into(), format_node(&self.id).into());
        for (key, value) in [("serial", &self.serial), ("iothread", &self.iothread), ("bus", &self.bus)] {
            if let Some(v) = value {
                args.insert(key.into(), v.clone().into());
            }
        }
        Value::Object(args)
    }
}

/// QEMU's id syntax (`id_wellformed`): a letter, then letters, digits, `-`, `.`, `_`.
fn validate_id(field: &'static str, id: &str, max: usize) -> Result<(), QmpError> {
    let err = |reason| Err(QmpError::InvalidId { field, value: id.to_owned(), reason });
    let mut chars = id.chars();
    match chars.next() {
        None => return err("empty"),
        Some(c) if !c.is_ascii_alphabetic() => return err("must start with a letter"),
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return err("only letters, digits, '-', '.' and '_'");
    }
    if id.len() > max {
        return err("too long for a QEMU node name");
    }
    Ok(())
}

fn validate_serial(serial: &str) -> Result<(), QmpError> {
    let err = |reason| Err(QmpError::InvalidSerial { serial: serial.to_owned(), reason });
    if serial.is_empty() {
        return err("empty");
    }
    if !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return err("only printable ASCII without spaces");
    }
    if serial.len() > MAX_SERIAL_LEN {
        return err("longer than 20 bytes");
    }
    Ok(())
}

/// A virtio-blk device this client's naming scheme recognises as ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluggedDisk {
    /// Device id.
    pub id: String,
    /// The raw format node the device's drive is.
    pub node: String,
    /// The host file or block device.
    pub path: PathBuf,
    /// Whether QEMU has it read-only.
    pub read_only: bool,
}

/// One asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `DEVICE_DELETED`.
    pub event: String,
    /// Its data object (`Value::Null` when it has none).
    pub data: Value,
}

impl QmpEvent {
    /// Whether this is `DEVICE_DELETED` for device `id`. (QEMU also sends one
    /// for the device's virtio backend child, which has no `device` field.)
    pub fn is_device_deleted(&self, id: &str) -> bool {
        self.event == "DEVICE_DELETED" && self.data.get("device").and_then(Value::as_str) == Some(id)
    }
}

/// One message from QEMU, classified.
#[derive(Debug, PartialEq)]
enum Message {
    Greeting(Value),
    Return { id: Option<Value>, value: Value },
    Error { id: Option<Value>, class: String, desc: String },
    Event(QmpEvent),
}

fn parse_message(line: &[u8]) -> Result<Message, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut m) = v else {
        return Err("message is not a JSON object".into());
    };
    let id = m.remove("id");
    if let Some(g) = m.remove("QMP") {
        return Ok(Message::Greeting(g));
    }
    if let Some(value) = m.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = m.remove("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_owned);
        let class = field("class").ok_or("error without class")?;
        return Ok(Message::Error { id, class, desc: field("desc").unwrap_or_default() });
    }
    if let Some(Value::String(event)) = m.remove("event") {
        return Ok(Message::Event(QmpEvent { event, data: m.remove("data").unwrap_or(Value::Null) }));
    }
    Err("neither greeting, return, error nor event".into())
}

/// A connection to QEMU's QMP monitor.
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Bytes of a line not complete yet. Kept across calls so a read cut off
    /// by a timeout loses nothing.
    line: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    greeting: Value,
    command_timeout: Duration,
    /// Devices this connection sent `device_del` for whose `DEVICE_DELETED`
    /// has not been seen: QEMU refuses a second `device_del` while one is
    /// pending, so a retried unplug only waits.
    unplug_requested: HashSet<String>,
}

impl Qmp {
    /// Connects, reads QEMU's greeting and leaves capabilities negotiation
    /// mode (`qmp_capabilities`), so commands work.
    pub async fn connect(socket: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(socket).await.map_err(|source| QmpError::Io { op: "connect", socket: socket.to_owned(), source })?;
        Qmp::handshake(socket, stream).await
    }

    /// [`Qmp::connect`], retrying while the socket does not exist yet or
    /// refuses (QEMU still starting), for at most `within`.
    pub async fn connect_within(socket: &Path, within: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + within;
        loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => return Qmp::handshake(socket, stream).await,
                Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => return Err(QmpError::Io { op: "connect", socket: socket.to_owned(), source }),
            }
        }
    }

    async fn handshake(socket: &Path, stream: UnixStream) -> Result<Qmp, QmpError> {
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            socket: socket.to_owned(),
            reader: BufReader::new(read),
            writer,
            line: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            unplug_requested: HashSet::new(),
        };
        let deadline = Instant::now() + qmp.command_timeout;
        match qmp.read_message(deadline, "greeting", qmp.command_timeout).await? {
            Message::Greeting(g) => qmp.greeting = g,
            other => return Err(qmp.protocol(format!("expected the greeting, got {other:?}"))),
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's greeting (`{"version": …, "capabilities": […]}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The monitor socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How long [`Qmp::execute`] waits for an answer (default [`DEFAULT_COMMAND_TIMEOUT`]).
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    fn protocol(&self, reason: String) -> QmpError {
        QmpError::Protocol { socket: self.socket.clone(), reason }
    }

    /// Reads one message by `deadline`; a timeout names `what` and the
    /// whole wait, `waited`.
    async fn read_message(&mut self, deadline: Instant, what: &str, waited: Duration) -> Result<Message, QmpError> {
        loop {
            let read = tokio::time::timeout_at(deadline, self.reader.read_until(b'\n', &mut self.line)).await;
            let n = match read {
                Err(_) => return Err(QmpError::Timeout { what: what.to_owned(), after: waited }),
                Ok(Err(source)) => return Err(QmpError::Io { op: "read", socket: self.socket.clone(), source }),
                Ok(Ok(n)) => n,
            };
            if n == 0 || !self.line.ends_with(b"\n") {
                return Err(QmpError::Closed { socket: self.socket.clone() });
            }
            let line = std::mem::take(&mut self.line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return parse_message(&line).map_err(|reason| self.protocol(reason));
        }
    }

    fn buffer_event(&mut self, event: QmpEvent) {
        tracing::debug!(event = %event.event, data = %event.data, "qmp event");
        if self.events.len() >= EVENT_BUFFER {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Runs `command` and returns its `return` value; events that arrive
    /// meanwhile are buffered. A QMP error becomes [`QmpError::Command`].
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), command.into());
        if let Some(a) = arguments {
            request.insert("arguments".into(), a);
        }
        request.insert("id".into(), id.into());
        let mut bytes = serde_json::to_vec(&Value::Object(request)).map_err(|e| self.protocol(format!("encode {command}: {e}")))?;
        bytes.push(b'\n');
        tracing::trace!(command, "qmp execute");
        self.writer.write_all(&bytes).await.map_err(|source| QmpError::Io { op: "write", socket: self.socket.clone(), source })?;
        let deadline = Instant::now() + self.command_timeout;
        loop {
            // A response without an id answers a request QEMU could not even
            // parse; with one request in flight, that is ours.
            let ours = |rid: &Option<Value>| rid.as_ref().is_none_or(|r| r.as_u64() == Some(id));
            match self.read_message(deadline, command, self.command_timeout).await? {
                Message::Event(e) => self.buffer_event(e),
                // The late answer to a command that timed out: nobody waits for it.
                m @ (Message::Return { .. } | Message::Error { .. }) if self.is_stale(&m) => tracing::debug!(?m, "stale qmp answer"),
                Message::Return { id: rid, value } if ours(&rid) => return Ok(value),
                Message::Error { id: rid, class, desc } if ours(&rid) => {
                    return Err(QmpError::Command { command: command.to_owned(), class, desc });
                }
                other => return Err(self.protocol(format!("{command}: unexpected {other:?}"))),
            }
        }
    }

    /// Whether `m` answers a request before the one in flight (ids grow by one
    /// per request; the next one is `next_id`).
    fn is_stale(&self, m: &Message) -> bool {
        let (Message::Return { id: Some(id), .. } | Message::Error { id: Some(id), .. }) = m else {
            return false;
        };
        id.as_u64().is_some_and(|id| id + 1 < self.next_id)
    }

    /// Takes every buffered event, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits up to `timeout` for an event matching `pred`, buffered or new;
    /// returns and removes it. Other events stay buffered.
    pub async fn wait_event(&mut self, timeout: Duration, mut pred: impl FnMut(&QmpEvent) -> bool) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(&mut pred) {
            return Ok(self.events.remove(i).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, "event", timeout).await {
                Ok(Message::Event(e)) if pred(&e) => return Ok(e),
                Ok(Message::Event(e)) => self.buffer_event(e),
                Ok(m) if self.is_stale(&m) => tracing::debug!(?m, "stale qmp answer"),
                Ok(other) => return Err(self.protocol(format!("unexpected {other:?} while no command runs"))),
                Err(e) => return Err(e),
            }
        }
    }

    /// Plugs `disk` in: protocol node, raw node, then the virtio-blk-pci
    /// device. Nothing is sent when the disk does not validate or the path is
    /// neither a regular file nor a block device. When a step fails, the
    /// nodes this call added are deleted again and the step's error returned.
    pub async fn hotplug(&mut self, disk: &Disk) -> Result<(), QmpError> {
        disk.validate()?;
        let meta = tokio::fs::metadata(&disk.path).await.map_err(|source| QmpError::Path { path: disk.path.clone(), source })?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(QmpError::NotFileOrBlockDevice { path: disk.path.clone() });
        }
        self.execute("blockdev-add", Some(disk.file_node_args(block_device))).await?;
        if let Err(e) = self.execute("blockdev-add", Some(disk.format_node_args())).await {
            self.roll_back(&[file_node(&disk.id)]).await;
            return Err(e);
        }
        if let Err(e) = self.execute("device_add", Some(disk.device_args())).await {
            self.roll_back(&[format_node(&disk.id), file_node(&disk.id)]).await;
            return Err(e);
        }
        self.unplug_requested.remove(&disk.id);
        tracing::info!(id = %disk.id, path = %disk.path.display(), "hot-plugged virtio-blk disk");
        Ok(())
    }

    /// Deletes nodes after a failed step; the step's error is what the caller
    /// needs, so a failure here is only logged.
    async fn roll_back(&mut self, nodes: &[String]) {
        for node in nodes {
            if let Err(e) = self.blockdev_del(node).await {
                tracing::warn!(node, error = %e, "roll back blockdev-add");
            }
        }
    }

    async fn blockdev_del(&mut self, node: &str) -> Result<(), QmpError> {
        self.execute("blockdev-del", Some(json!({ "node-name": node }))).await.map(drop)
    }

    /// The virtio-blk devices plugged through this naming scheme (by any
    /// client), sorted by id.
    pub async fn disks(&mut self) -> Result<Vec<PluggedDisk>, QmpError> {
        let blocks = self.execute("query-block", None).await?;
        let mut disks = parse_query_block(&blocks).map_err(|reason| self.protocol(format!("query-block: {reason}")))?;
        disks.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(disks)
    }

    /// Names of the block nodes with our prefixes, device or not (after a
    /// timed-out unplug, or from a client that died half-way), sorted.
    pub async fn our_nodes(&mut self) -> Result<Vec<String>, QmpError> {
        let nodes = self.execute("query-named-block-nodes", Some(json!({ "flat": true }))).await?;
        let list = nodes.as_array().ok_or_else(|| self.protocol("query-named-block-nodes: not a list".into()))?;
        let mut names: Vec<String> = list
            .iter()
            .filter_map(|n| n.get("node-name").and_then(Value::as_str))
            .filter(|n| n.starts_with(FORMAT_NODE_PREFIX) || n.starts_with(FILE_NODE_PREFIX))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Unplugs disk `id`: `device_del`, then waits up to `timeout` for the
    /// guest to release it (`DEVICE_DELETED`), then deletes both block nodes.
    /// If the guest does not answer in time: [`QmpError::Timeout`], and the
    /// device and nodes stay; calling again on the same connection waits
    /// again (QEMU refuses a second `device_del` while one is pending, and
    /// a new connection gets that refusal as [`QmpError::Command`]); once
    /// the guest released the device, `unplug` deletes the nodes. An id that
    /// is neither a device nor a node of ours: [`QmpError::UnknownDisk`].
    pub async fn unplug(&mut self, id: &str, timeout: Duration) -> Result<(), QmpError> {
        validate_id("disk id", id, MAX_ID_LEN)?;
        let plugged = self.disks().await?.iter().any(|d| d.id == id);
        let (fnode, rnode) = (file_node(id), format_node(id));
        let nodes: Vec<String> = self.our_nodes().await?.into_iter().filter(|n| *n == fnode || *n == rnode).collect();
        if !plugged && nodes.is_empty() {
            return Err(QmpError::UnknownDisk { id: id.to_owned() });
        }
        if plugged {
            if !self.unplug_requested.contains(id) {
                match self.execute("device_del", Some(json!({ "id": id }))).await {
                    Ok(_) => {}
                    // Gone between query-block and now: its event is on its way.
                    Err(e) if e.class() == Some("DeviceNotFound") => {}
                    Err(e) => return Err(e),
                }
                self.unplug_requested.insert(id.to_owned());
            }
            match self.wait_event(timeout, |e| e.is_device_deleted(id)).await {
                Ok(_) => {}
                Err(QmpError::Timeout { after, .. }) => {
                    return Err(QmpError::Timeout { what: format!("DEVICE_DELETED for {id}"), after });
                }
                Err(e) => return Err(e),
            }
        } else {
            // The device is gone already (the guest released it after an
            // earlier, timed-out unplug); drop a stale event for it, if any,
            // so it cannot satisfy the unplug of a re-plugged disk.
            self.events.retain(|e| !e.is_device_deleted(id));
        }
        self.unplug_requested.remove(id);
        // Format node first: it holds the protocol node.
        for node in [rnode, fnode] {
            if nodes.contains(&node) {
                self.blockdev_del(&node).await?;
            }
        }
        tracing::info!(id, "unplugged virtio-blk disk");
        Ok(())
    }
}

/// Our disks in a `query-block` answer: the entries whose inserted medium is
/// one of our format nodes. (Devices plugged from `-blockdev` have an empty
/// `device` name, so the node name is what identifies them.)
fn parse_query_block(blocks: &Value) -> Result<Vec<PluggedDisk>, String> {
    let list = blocks.as_array().ok_or("not a list")?;
    let mut out = Vec::new();
    for b in list {
        let Some(inserted) = b.get("inserted") else { continue };
        let Some(node) = inserted.get("node-name").and_then(Value::as_str) else { continue };
        let Some(id) = node.strip_prefix(FORMAT_NODE_PREFIX) else { continue };
        let path = inserted.get("file").and_then(Value::as_str).ok_or_else(|| format!("{node}: no file"))?;
        let read_only = inserted.get("ro").and_then(Value::as_bool).ok_or_else(|| format!("{node}: no ro"))?;
        out.push(PluggedDisk { id: id.to_owned(), node: node.to_owned(), path: PathBuf::from(path), read_only });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::ffi::OsStringExt;

    use super::*;

    fn disk() -> Disk {
        Disk::new("vol-1", "/dev/loop3")
    }

    #[test]
    fn ids_follow_qemu_syntax_and_fit_node_names() {
        for ok in ["a", "vol-1", "Disk_2.x", &"a".repeat(MAX_ID_LEN)] {
            assert!(validate_id("disk id", ok, MAX_ID_LEN).is_ok(), "{ok}");
        }
        for bad in ["", "1vol", "-a", "a b", "a/b", "vol#1", "völ", &"a".repeat(MAX_ID_LEN + 1)] {
            let e = validate_id("disk id", bad, MAX_ID_LEN).unwrap_err();
            assert!(matches!(e, QmpError::InvalidId { field: "disk id", .. }), "{bad}: {e}");
            assert_eq!(e.kind(), QmpErrorKind::InvalidArgument);
        }
        assert_eq!(format_node(&"a".repeat(MAX_ID_LEN)).len(), 31);
        assert_eq!(file_node(&"a".repeat(MAX_ID_LEN)).len(), 31);
    }

    #[test]
    fn disks_validate_serial_iothread_bus_and_aio() {
        assert!(disk().validate().is_ok());
        let with = |f: fn(&mut Disk)| {
            let mut d = disk();
            f(&mut d);
            d.validate()
        };
        assert!(with(|d| d.serial = Some("X".repeat(20))).is_ok());
        assert!(matches!(with(|d| d.serial = Some("X".repeat(21))), Err(QmpError::InvalidSerial { .. })));
        assert!(matches!(with(|d| d.serial = Some("a b".into())), Err(QmpError::InvalidSerial { .. })));
        assert!(matches!(with(|d| d.serial = Some("sérial".into())), Err(QmpError::InvalidSerial { .. })));
        assert!(matches!(with(|d| d.serial = Some(String::new())), Err(QmpError::InvalidSerial { .. })));
        assert!(matches!(with(|d| d.iothread = Some("0io".into())), Err(QmpError::InvalidId { field: "iothread", .. })));
        assert!(matches!(with(|d| d.bus = Some("rp 0".into())), Err(QmpError::InvalidId { field: "bus", .. })));
        assert!(with(|d| d.aio = Aio::Native).is_ok(), "native with O_DIRECT");
        let e = with(|d| {
            d.aio = Aio::Native;
            d.cache_direct = false;
        })
        .unwrap_err();
        assert!(matches!(e, QmpError::NativeAioWithoutDirect { .. }));
        assert_eq!(e.kind(), QmpErrorKind::InvalidArgument);
        assert!(
            with(|d| {
                d.aio = Aio::IoUring;
                d.cache_direct = false;
            })
            .is_ok()
        );
        assert!(matches!(with(|d| d.path = "disk.img".into()), Err(QmpError::InvalidPath { reason: "not absolute", .. })));
        let e = with(|d| d.path = PathBuf::from(std::ffi::OsString::from_vec(b"/img/\xff.raw".to_vec()))).unwrap_err();
        assert!(matches!(e, QmpError::InvalidPath { reason: "not UTF-8", .. }), "{e}");
        assert_eq!(e.kind(), QmpErrorKind::InvalidArgument);
    }

    #[test]
    fn blockdev_and_device_arguments() {
        let mut d = disk();
        d.read_only = true;
        d.cache_direct = false;
        d.aio = Aio::IoUring;
        d.serial = Some("SN1".into());
        d.bus = Some("rp0".into());
        assert_eq!(
            d.file_node_args(true),
            json!({"driver": "host_device", "node-name": "tbxf-vol-1", "filename": "/dev/loop3", "aio": "io_uring",
                   "cache": {"direct": false, "no-flush": false}, "read-only": true, "discard": "unmap"})
        );
        assert_eq!(d.file_node_args(false)["driver"], "file");
        assert_eq!(
            d.format_node_args(),
            json!({"driver": "raw", "node-name": "tbxr-vol-1", "file": "tbxf-vol-1",
                   "cache": {"direct": false, "no-flush": false}, "read-only": true, "discard": "unmap"})
        );
        assert_eq!(d.device_args(), json!({"driver": "virtio-blk-pci", "id": "vol-1", "drive": "tbxr-vol-1", "serial": "SN1", "bus": "rp0"}));
        d.iothread = Some("io0".into());
        d.serial = None;
        d.bus = None;
        assert_eq!(d.device_args(), json!({"driver": "virtio-blk-pci", "id": "vol-1", "drive": "tbxr-vol-1", "iothread": "io0"}));
    }

    #[test]
    fn messages_are_classified() {
        let p = |s: &str| parse_message(s.as_bytes());
        assert_eq!(p(r#"{"QMP": {"version": {}, "capabilities": []}}"#).unwrap(), Message::Greeting(json!({"version": {}, "capabilities": []})));
        assert_eq!(p(r#"{"return": {}, "id": 3}"#).unwrap(), Message::Return { id: Some(json!(3)), value: json!({}) });
        assert_eq!(
            p(r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}"#).unwrap(),
            Message::Error { id: None, class: "DeviceNotFound".into(), desc: "Device 'x' not found".into() }
        );
        assert_eq!(
            p(r#"{"event": "DEVICE_DELETED", "data": {"device": "v", "path": "/machine/peripheral/v"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#).unwrap(),
            Message::Event(QmpEvent { event: "DEVICE_DELETED".into(), data: json!({"device": "v", "path": "/machine/peripheral/v"}) })
        );
        assert!(p("[1]").is_err());
        assert!(p("{").is_err());
        assert!(p(r#"{"error": {"desc": "no class"}}"#).is_err());
        assert!(p(r#"{"something": 1}"#).is_err());
    }

    #[test]
    fn query_block_keeps_only_our_nodes() {
        let blocks = json!([
            {"device": "", "qdev": "/machine/peripheral/vol-1/virtio-backend", "inserted": {"node-name": "tbxr-vol-1", "file": "/img/a.raw", "ro": false}},
            {"device": "", "qdev": "/machine/peripheral/other/virtio-backend", "inserted": {"node-name": "theirs", "file": "/img/b.raw", "ro": false}},
            {"device": "cd0", "removable": true},
            {"device": "", "qdev": "/machine/peripheral/ro/virtio-backend", "inserted": {"node-name": "tbxr-ro", "file": "/dev/loop1", "ro": true}},
        ]);
        assert_eq!(
            parse_query_block(&blocks).unwrap(),
            vec![
                PluggedDisk { id: "vol-1".into(), node: "tbxr-vol-1".into(), path: "/img/a.raw".into(), read_only: false },
                PluggedDisk { id: "ro".into(), node: "tbxr-ro".into(), path: "/dev/loop1".into(), read_only: true },
            ]
        );
        assert!(parse_query_block(&json!({})).is_err());
        assert!(parse_query_block(&json!([{"inserted": {"node-name": "tbxr-x"}}])).is_err());
    }

    /// A scripted QMP server on the other end of a real socket pair: events
    /// arrive before and between answers and must be buffered, not lost.
    #[tokio::test]
    async fn events_interleaved_with_answers_are_buffered() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7}}, \"capabilities\": []}}\r\n").await.unwrap();
            let req: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(req["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", req["id"]).as_bytes()).await.unwrap();
            let req: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(req["execute"], "query-status");
            // A late answer to an earlier request (one that timed out), an
            // event split across writes, then another, then the answer.
            w.write_all(b"{\"return\": {\"late\": true}, \"id\": 1}\r\n").await.unwrap();
            w.write_all(b"{\"event\": \"RESUME\", ").await.unwrap();
            w.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            w.write_all(b"\"data\": {}}\r\n{\"event\": \"DEVICE_DELETED\", \"data\": {\"path\": \"/machine/peripheral/d1/virtio-backend\"}}\r\n")
                .await
                .unwrap();
            w.write_all(format!("{{\"return\": {{\"status\": \"running\"}}, \"id\": {}}}\r\n", req["id"]).as_bytes()).await.unwrap();
            let req: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(req["arguments"], json!({"id": "nope"}));
            w.write_all(
                format!("{{\"error\": {{\"class\": \"DeviceNotFound\", \"desc\": \"Device 'nope' not found\"}}, \"id\": {}}}\r\n", req["id"])
                    .as_bytes(),
            )
            .await
            .unwrap();
            // Arrives while the client waits for it, after a delay.
            tokio::time::sleep(Duration::from_millis(50)).await;
            w.write_all(b"{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"d1\", \"path\": \"/machine/peripheral/d1\"}}\r\n").await.unwrap();
            // Then close: the client must say so, not hang.
            lines.next_line().await.unwrap();
        });
        let mut qmp = Qmp::connect(&sock).await.unwrap();
        assert_eq!(qmp.greeting()["version"]["qemu"]["major"], 7);
        assert_eq!(qmp.execute("query-status", None).await.unwrap(), json!({"status": "running"}));
        let e = qmp.execute("device_del", Some(json!({"id": "nope"}))).await.unwrap_err();
        assert!(matches!(&e, QmpError::Command { command, class, .. } if command == "device_del" && class == "DeviceNotFound"), "{e}");
        assert_eq!(e.kind(), QmpErrorKind::Command);
        let deleted = qmp.wait_event(Duration::from_secs(5), |e| e.is_device_deleted("d1")).await.unwrap();
        assert_eq!(deleted.data["path"], "/machine/peripheral/d1");
        let rest: Vec<String> = qmp.take_events().into_iter().map(|e| e.event).collect();
        assert_eq!(rest, ["RESUME", "DEVICE_DELETED"], "the backend's event (no device field) stays buffered");
        let e = qmp.wait_event(Duration::from_millis(50), |_| true).await.unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        drop(qmp);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_connection_is_an_error_not_a_hang() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"ver").await.unwrap();
        });
        let e = Qmp::connect(&sock).await.unwrap_err();
        assert!(matches!(e, QmpError::Closed { .. }), "{e}");
        server.await.unwrap();
        let e = Qmp::connect(&tmp.path().join("none.sock")).await.unwrap_err();
        assert!(matches!(&e, QmpError::Io { op: "connect", .. }), "{e}");
    }
}
