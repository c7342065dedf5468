//! The host side of the guest console: scripts go to a virtio serial port of
//! the guest (a unix socket on the host) framed by a unique token, and come back
//! between `<token> begin` and `<token> end <status>` lines (the guest side is
//! `guest/console.sh`). The port is no tty, so nothing is echoed or rewritten;
//! bytes outside a frame (a background process's output) are skipped. Every
//! byte received is appended to `console.log`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::Error;

/// Scripts travel in one frame and land in the guest's tmpfs; a bound keeps
/// a runaway caller from filling it.
pub const MAX_SCRIPT: usize = 1024 * 1024;
const READY: &[u8] = b"THINBOX-READY ";

#[derive(Debug)]
pub(crate) struct Console {
    stream: Option<UnixStream>,
    /// Received, not yet consumed.
    buf: Vec<u8>,
    log: File,
    log_path: PathBuf,
    seq: u64,
    poisoned: bool,
}

impl Console {
    pub(crate) fn detached(log_path: PathBuf) -> io::Result<Console> {
        Ok(Console { stream: None, buf: Vec::new(), log: File::create(&log_path)?, log_path, seq: 0, poisoned: false })
    }

    pub(crate) fn attach(&mut self, stream: UnixStream) {
        self.stream = Some(stream);
    }

    /// Waits for the guest's ready line; the kernel release it names.
    pub(crate) fn wait_ready(&mut self, deadline: Instant) -> Result<String, Error> {
        loop {
            if let Some(at) = find(&self.buf, READY)
                && let Some(nl) = self.buf[at..].iter().position(|&b| b == b'\n')
            {
                let release = String::from_utf8_lossy(&self.buf[at + READY.len()..at + nl]).trim().to_owned();
                self.buf.drain(..at + nl + 1);
                return Ok(release);
            }
            self.fill(deadline, Duration::ZERO)?;
        }
    }

    pub(crate) fn run(&mut self, script: &str, timeout: Duration) -> Result<crate::Output, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if script.len() > MAX_SCRIPT {
            return Err(Error::ScriptTooLarge { len: script.len(), max: MAX_SCRIPT });
        }
        let deadline = Instant::now() + timeout;
        let token = self.send(script)?;
        let begin = format!("{token} begin\n");
        let end = format!("\n{token} end ");
        // Skip to the frame's start. Each search resumes where the last one
        // ended (less a marker's length): output can be megabytes.
        let mut from = 0;
        let start = loop {
            if let Some(at) = find(&self.buf[from..], begin.as_bytes()) {
                break from + at + begin.len();
            }
            from = self.buf.len().saturating_sub(begin.len());
            self.fill(deadline, timeout)?;
        };
        self.buf.drain(..start);
        let mut from = 0;
        loop {
            if let Some(at) = find(&self.buf[from..], end.as_bytes()).map(|at| from + at) {
                let rest = &self.buf[at + end.len()..];
                if let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                    let status_text = String::from_utf8_lossy(&rest[..nl]).into_owned();
                    let status = status_text.trim().parse::<i32>().map_err(|_| Error::Protocol(format!("bad status {status_text:?}")))?;
                    let stdout = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                    self.buf.drain(..at + end.len() + nl + 1);
                    return Ok(crate::Output { status, stdout });
                }
            } else {
                from = self.buf.len().saturating_sub(end.len());
            }
            self.fill(deadline, timeout)?;
        }
    }

    /// Sends a script whose frame will never close (e.g. `poweroff -f`).
    pub(crate) fn send_final(&mut self, script: &str) -> Result<(), Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        self.send(script).map(drop)
    }

    fn send(&mut self, script: &str) -> Result<String, Error> {
        self.seq += 1;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let token = format!("@@thinbox-{}-{nanos:08x}", self.seq);
        let mut frame = format!("{token} {}\n", script.len()).into_bytes();
        frame.extend_from_slice(script.as_bytes());
        let stream = self.stream.as_mut().ok_or_else(|| Error::Protocol("console not connected".into()))?;
        stream.write_all(&frame).map_err(Error::io("write", &self.log_path))?;
        Ok(token)
    }

    /// Reads what is there (blocking until `deadline`) into the buffer.
    fn fill(&mut self, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        let stream = self.stream.as_mut().ok_or_else(|| Error::Protocol("console not connected".into()))?;
        let now = Instant::now();
        if now >= deadline {
            self.poisoned = true;
            return Err(Error::Timeout { timeout, tail: self.tail() });
        }
        // A zero read timeout would mean "block forever".
        stream.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1)))).map_err(Error::io("set timeout on", &self.log_path))?;
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk) {
            Ok(0) => Err(Error::Exited { status: "unknown".into(), tail: self.tail() }),
            Ok(n) => {
                let _ = self.log.write_all(&chunk[..n]);
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => Ok(()),
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
                Err(Error::Exited { status: "unknown".into(), tail: self.tail() })
            }
            Err(e) => Err(Error::io("read", &self.log_path)(e)),
        }
    }

    fn tail(&self) -> String {
        let from = self.buf.len().saturating_sub(2000);
        String::from_utf8_lossy(&self.buf[from..]).into_owned()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The host side against a shell running the guest's loop over a socket
    /// pair: framing, status, output without a trailing newline, noise
    /// outside frames, and a timeout that poisons the console.
    #[test]
    fn framing_against_the_guest_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let (host, guest) = UnixStream::pair().unwrap();
        // The guest loop without its port set-up and power-off.
        let body: String =
            include_str!("guest/console.sh").lines().filter(|l| !l.starts_with("exec ") && !l.starts_with("poweroff")).collect::<Vec<_>>().join("\n");
        let body = body.replace("/tmp/.thinbox-script", &tmp.path().join("s").display().to_string());
        let guest_in = guest.try_clone().unwrap();
        let mut sh = std::process::Command::new("busybox")
            .args(["sh", "-c", &body])
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(guest_in)))
            .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(guest)))
            .spawn()
            .unwrap();
        let mut c = Console::detached(tmp.path().join("console.log")).unwrap();
        c.attach(host);
        c.wait_ready(Instant::now() + Duration::from_secs(10)).unwrap();
        let t = Duration::from_secs(10);
        let out = c.run("echo hello; echo err >&2; exit 3", t).unwrap();
        assert_eq!(out, crate::Output { status: 3, stdout: "hello\nerr\n".into() });
        assert_eq!(c.run("printf 'no newline'", t).unwrap().stdout, "no newline");
        assert_eq!(c.run("(sleep 0.2; echo late-noise) & true", t).unwrap().stdout, "");
        // The noise arrives between frames and is skipped.
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(c.run("printf '%s' \"$(seq 1 3)\"", t).unwrap(), crate::Output { status: 0, stdout: "1\n2\n3".into() });
        let big = format!("x='{}'; echo ${{#x}}", "y".repeat(40000));
        assert_eq!(c.run(&big, t).unwrap().stdout, "40000\n");
        assert!(matches!(c.run(&"#".repeat(MAX_SCRIPT + 1), t), Err(Error::ScriptTooLarge { .. })));
        assert!(matches!(c.run("sleep 3", Duration::from_millis(300)), Err(Error::Timeout { .. })));
        assert!(matches!(c.run("true", t), Err(Error::Poisoned)));
        sh.kill().unwrap();
        sh.wait().unwrap();
        assert!(std::fs::read_to_string(tmp.path().join("console.log")).unwrap().contains("late-noise"));
    }
}
