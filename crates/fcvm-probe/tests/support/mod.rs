//! Runs the probe under the real Firecracker for the integration tests and
//! the figures bench: process guard, serial line reader, a minimal API
//! client.

#![allow(dead_code)] // each user (tests, bench) needs a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use fcvm_probe::output::ProbeLine;
use fcvm_probe::ProbeArgs;

/// The Firecracker binary from `FCVM_FIRECRACKER_BIN`, or `None` after a
/// loud SKIPPED notice when it is unset or missing. The notice goes straight
/// to the stderr handle: libtest's capture only swallows `eprintln!`.
pub fn firecracker_bin(test: &str) -> Option<PathBuf> {
    let why = match std::env::var_os("FCVM_FIRECRACKER_BIN").map(PathBuf::from) {
        Some(path) if path.is_file() => return Some(path),
        Some(path) => format!("FCVM_FIRECRACKER_BIN={} is not a file", path.display()),
        None => "FCVM_FIRECRACKER_BIN is not set (needs a real Firecracker v1.12.1)".to_owned(),
    };
    // CI always provides Firecracker: a skip there would hide a broken setup.
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} (required under CI)");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    None
}

/// One serial line and when the host read it.
pub struct Seen {
    pub at: Instant,
    pub line: ProbeLine,
}

/// A Firecracker process running the probe. Dropping it kills the process
/// and removes its directory (config, sockets, snapshots).
pub struct Vm {
    child: Child,
    lines: Receiver<(Instant, String)>,
    /// Every serial line read so far, for failure messages.
    transcript: Vec<String>,
    /// When the process was spawned.
    pub spawned: Instant,
    /// Scratch directory owned by this VM.
    pub dir: tempfile::TempDir,
    /// API socket, when started with one.
    pub api_sock: Option<PathBuf>,
}

/// How to start Firecracker.
pub enum Start<'a> {
    /// Boot the probe from a config file; optionally also serve the API.
    Boot {
        mem_mib: u64,
        args: &'a ProbeArgs,
        api: bool,
    },
    /// Start with only an API socket (to load a snapshot into).
    ApiOnly,
}

impl Vm {
    pub fn start(bin: &Path, how: Start<'_>) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("fcvm-probe-it-")
            .tempdir()
            .expect("create a temp dir for the VM");
        let log = dir.path().join("firecracker.log");
        std::fs::write(&log, b"").expect("create the Firecracker log file");
        let mut cmd = Command::new(bin);
        cmd.arg("--log-path").arg(&log).args(["--level", "Warning"]);
        let mut api_sock = None;
        let mut want_api = true;
        if let Start::Boot { mem_mib, args, api } = how {
            want_api = api;
            let kernel = dir.path().join("probe.elf");
            fcvm_probe::write_kernel(&kernel).expect("write the probe kernel");
            let config = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": kernel,
                    "boot_args": format!("console=ttyS0 reboot=k pci=off {}", args.to_boot_args()),
                },
                "machine-config": { "vcpu_count": 1, "mem_size_mib": mem_mib },
                "drives": [],
            });
            let cfg = dir.path().join("config.json");
            std::fs::write(&cfg, config.to_string()).expect("write the Firecracker config");
            cmd.arg("--config-file").arg(&cfg);
        }
        if want_api {
            let sock = dir.path().join("api.sock");
            cmd.arg("--api-sock").arg(&sock);
            api_sock = Some(sock);
        } else {
            cmd.arg("--no-api");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd.spawn().expect("spawn firecracker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if tx.send((Instant::now(), line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let vm = Vm {
            child,
            lines,
            transcript: Vec::new(),
            spawned,
            dir,
            api_sock,
        };
        if let Some(sock) = &vm.api_sock {
            vm.wait_for_socket(sock);
        }
        vm
    }

    fn wait_for_socket(&self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "API socket {} never came up",
                sock.display()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let log =
            std::fs::read_to_string(self.dir.path().join("firecracker.log")).unwrap_or_default();
        panic!(
            "{why}\n--- serial so far ---\n{}--- firecracker stderr ---\n{stderr}\n--- firecracker log ---\n{log}",
            self.transcript.concat()
        );
    }

    /// The next line that parses as probe output (other lines are skipped,
    /// such as a fragment left by a snapshot taken mid-line).
    pub fn next(&mut self, timeout: Duration) -> Seen {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, text)) => {
                    self.transcript.push(text.clone());
                    match ProbeLine::parse(&text) {
                        Ok(Some(line)) => return Seen { at, line },
                        Ok(None) => {}
                        Err(e) => self.fail(&format!("malformed probe line {text:?}: {e}")),
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no probe line within {timeout:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => self.fail("firecracker closed its stdout"),
            }
        }
    }

    /// Probe lines that arrive until the serial output has been quiet for
    /// `quiet` (for instance everything a paused VM printed before pausing).
    pub fn drain(&mut self, quiet: Duration) -> Vec<Seen> {
        let mut seen = Vec::new();
        while let Ok((at, text)) = self.lines.recv_timeout(quiet) {
            self.transcript.push(text.clone());
            match ProbeLine::parse(&text) {
                Ok(Some(line)) => seen.push(Seen { at, line }),
                Ok(None) => {}
                Err(e) => self.fail(&format!("malformed probe line {text:?}: {e}")),
            }
        }
        seen
    }

    /// Skips lines until `pick` accepts one.
    pub fn until<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&ProbeLine) -> Option<T>,
    ) -> (Instant, T) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let seen = self.next(left);
            if let Some(v) = pick(&seen.line) {
                return (seen.at, v);
            }
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Ok(None) => self.fail(&format!("firecracker still running after {timeout:?}")),
                Err(e) => self.fail(&format!("waiting for firecracker: {e}")),
            }
        }
    }

    /// Firecracker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process now but keeps the directory (and its snapshots).
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// One API request; returns the status code and body.
    pub fn api(&mut self, method: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
        let Some(sock) = self.api_sock.clone() else {
            self.fail("this VM was started without an API socket")
        };
        match http_request(&sock, method, path, &body.to_string()) {
            Ok(reply) => reply,
            Err(e) => self.fail(&format!("{method} {path}: {e}")),
        }
    }

    /// Like [`Vm::api`] but insists on a 2xx answer.
    pub fn api_ok(&mut self, method: &str, path: &str, body: serde_json::Value) {
        let (status, reply) = self.api(method, path, &body);
        if !(200..300).contains(&status) {
            self.fail(&format!("{method} {path} {body} -> {status} {reply}"));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Last line of defence: never leave a Firecracker behind.
        self.kill();
    }
}

/// Minimal HTTP/1.1 over a Unix socket, one request per connection.
fn http_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut reply = vec![0u8; length];
    reader.read_exact(&mut reply)?;
    Ok((status, String::from_utf8_lossy(&reply).into_owned()))
}
