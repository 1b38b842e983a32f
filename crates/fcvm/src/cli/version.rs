//! `fcvm --version`: fcvm's own version and those of the pieces it would use, the guest agent
//! and Firecracker, as found right now. Never fails: a missing or silent piece is reported as
//! such, and every `--version` it runs is bounded in time.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::firecracker::binary::{self, Program, Version};
use crate::paths::Paths;

/// How long a found binary may take to answer `--version`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The report, one line per piece.
pub fn report(paths: &Paths) -> String {
    let agent = crate::setup::initrd::find_agent_binary().ok();
    let firecracker = binary::locate(Program::Firecracker, paths).ok();
    render(agent.as_deref(), firecracker.as_deref())
}

/// The report for the agent and Firecracker at these paths (`None`: not found).
pub fn render(agent: Option<&Path>, firecracker: Option<&Path>) -> String {
    let agent = match agent {
        None => "not found (build it, or set FCVM_AGENT_BIN; see `fcvm setup agent`)".to_owned(),
        Some(path) => match ask_version(path) {
            Ok(text) => match agent_version(&text) {
                Some(v) => format!("{v} ({})", path.display()),
                None => format!(
                    "{} (version unknown: it predates `fc-agent --version`)",
                    path.display()
                ),
            },
            Err(why) => format!("{} (version unknown: {why})", path.display()),
        },
    };
    let firecracker = match firecracker {
        None => "not found (`fcvm setup firecracker`)".to_owned(),
        Some(path) => match ask_version(path) {
            Ok(text) => match Version::from_banner(&text) {
                Some(v) => format!("{v} ({})", path.display()),
                None => format!("{} (printed no version: {:?})", path.display(), text.trim()),
            },
            Err(why) => format!("{} (version unknown: {why})", path.display()),
        },
    };
    format!(
        "fcvm {}\nagent: {agent}\nfirecracker: {firecracker}\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// `fc-agent X.Y.Z` from the agent's answer.
fn agent_version(text: &str) -> Option<&str> {
    let line = text.lines().next()?.trim();
    line.strip_prefix("fc-agent ")?;
    Some(line)
}

/// What `path --version` prints on stdout, within [`ANSWER_TIMEOUT`].
fn ask_version(path: &Path) -> Result<String, String> {
    let mut child = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no answer to --version within {} s",
                    ANSWER_TIMEOUT.as_secs()
                ));
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn versions_of_what_is_found_and_not_found_for_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let agent = script(dir.path(), "fc-agent", "echo 'fc-agent 9.8.7'");
        let fc = script(
            dir.path(),
            "firecracker",
            "echo 'Firecracker v1.12.1'; echo",
        );
        let text = render(Some(&agent), Some(&fc));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("fcvm {}", env!("CARGO_PKG_VERSION")));
        assert_eq!(
            lines[1],
            format!("agent: fc-agent 9.8.7 ({})", agent.display())
        );
        assert_eq!(lines[2], format!("firecracker: 1.12.1 ({})", fc.display()));
        let text = render(None, None);
        assert!(text.contains("agent: not found"), "{text}");
        assert!(text.contains("firecracker: not found"), "{text}");
    }

    #[test]
    fn an_old_silent_or_hanging_binary_is_reported_never_fatal() {
        let dir = tempfile::tempdir().unwrap();
        // An agent from before `--version`: it refuses to run outside a VM.
        let old = script(dir.path(), "old-agent", "echo refusing >&2; exit 2");
        let junk = script(dir.path(), "junk", "echo hello");
        let hang = script(dir.path(), "hang", "exec sleep 30");
        let t = Instant::now();
        let text = render(Some(&old), Some(&hang));
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
        assert!(text.contains("predates `fc-agent --version`"), "{text}");
        assert!(text.contains("no answer to --version within 5 s"), "{text}");
        let text = render(Some(&dir.path().join("gone")), Some(&junk));
        assert!(text.contains("cannot run it"), "{text}");
        assert!(text.contains("printed no version: \"hello\""), "{text}");
    }
}
