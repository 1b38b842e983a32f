//! Reading a VM's serial console log while the VM writes it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

/// Follows a growing console log from a position, like `tail -f`.
#[derive(Debug)]
pub struct ConsoleFollower {
    file: File,
    position: u64,
}

impl ConsoleFollower {
    /// Follow `path` from its beginning.
    pub fn open(path: &Path) -> io::Result<ConsoleFollower> {
        Ok(ConsoleFollower {
            file: File::open(path)?,
            position: 0,
        })
    }

    /// Bytes appended since the last call (possibly none).
    pub fn read_new(&mut self) -> io::Result<Vec<u8>> {
        self.file.seek(SeekFrom::Start(self.position))?;
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf)?;
        self.position += buf.len() as u64;
        Ok(buf)
    }
}

/// Wait until a line of `path` satisfies `matches`, returning that line.
pub fn wait_for_line(
    path: &Path,
    timeout: Duration,
    mut matches: impl FnMut(&str) -> bool,
) -> io::Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    let mut pending = String::new();
    let mut follower = loop {
        match ConsoleFollower::open(path) {
            Ok(f) => break f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    };
    loop {
        pending.push_str(&String::from_utf8_lossy(&follower.read_new()?));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if matches(line) {
                return Ok(Some(line.to_owned()));
            }
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follows_appended_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = File::create(&path).unwrap();
        write!(f, "one\r\ntw").unwrap();
        let mut follower = ConsoleFollower::open(&path).unwrap();
        assert_eq!(follower.read_new().unwrap(), b"one\r\ntw");
        assert!(follower.read_new().unwrap().is_empty());
        writeln!(f, "o").unwrap();
        assert_eq!(follower.read_new().unwrap(), b"o\n");
        let line = wait_for_line(&path, Duration::from_millis(50), |l| l.starts_with("tw"));
        assert_eq!(line.unwrap().as_deref(), Some("two"));
        let none = wait_for_line(&path, Duration::from_millis(20), |l| l == "three").unwrap();
        assert!(none.is_none());
    }
}
