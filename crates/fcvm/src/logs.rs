//! Container logs: what a container wrote to stdout and stderr, kept per VM so `fcvm logs`
//! can show it during the run and after it, foreground or detached.
//!
//! The format is the CRI's (the one conmon, CRI-O and containerd write and `kubectl logs`
//! reads), one record per line:
//!
//! ```text
//! 2026-12-02T13:14:02.123456789Z stdout F a whole line
//! 2026-12-02T13:14:02.223456789Z stderr P the start of a line that
//! 2026-12-02T13:14:02.323456789Z stderr F  went on later
//! ```
//!
//! `F` ends a line, `P` is a piece of one (output without a newline yet, or a line longer
//! than [`MAX_RECORD_TEXT`]). The text is the container's bytes as they were, minus the
//! newline, so the two streams come back apart and byte for byte.
//!
//! The size is bounded: once `container.log` would grow past the limit it becomes
//! `container.log.1` (replacing the older one) and a new file starts, so a container that
//! prints without pause holds at most twice the limit on disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The current log file in a VM's log directory.
pub const LOG_FILE: &str = "container.log";
/// The rotated one.
pub const ROTATED_LOG_FILE: &str = "container.log.1";
/// fcvm's own messages from a detached run's supervisor (the container's output is not in it).
pub const SUPERVISOR_LOG_FILE: &str = "fcvm.log";
/// Default bound of one log file (so at most twice this on disk per VM).
pub const DEFAULT_MAX_BYTES: u64 = 4 << 20;
/// The smallest bound accepted (a record must fit with room to spare).
pub const MIN_MAX_BYTES: u64 = 4 << 10;
/// Longer lines are stored as several `P` records.
pub const MAX_RECORD_TEXT: usize = 16 << 10;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Appends records to a VM's log directory, rotating at the bound.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
}

impl LogWriter {
    /// Open (creating the directory and file) `dir/container.log` for appending.
    pub fn create(dir: &Path, max_bytes: u64) -> io::Result<LogWriter> {
        fs::create_dir_all(dir)?;
        let file = open_append(&dir.join(LOG_FILE))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_owned(),
            max_bytes: max_bytes.max(MIN_MAX_BYTES),
            file,
            size,
        })
    }

    /// Log a chunk of the container's output, stamped now.
    pub fn write(&mut self, stream: Stream, bytes: &[u8]) -> io::Result<()> {
        let stamp = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        for (text, partial) in records(bytes) {
            let mut line = Vec::with_capacity(text.len() + stamp.len() + 12);
            line.extend_from_slice(stamp.as_bytes());
            line.push(b' ');
            line.extend_from_slice(stream.as_str().as_bytes());
            line.extend_from_slice(if partial { b" P " } else { b" F " });
            line.extend_from_slice(text);
            line.push(b'\n');
            if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
                self.rotate()?;
            }
            // One write per record: a reader following the file never sees half of one
            // unless the disk is full.
            self.file.write_all(&line)?;
            self.size += line.len() as u64;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let current = self.dir.join(LOG_FILE);
        fs::rename(&current, self.dir.join(ROTATED_LOG_FILE))?;
        self.file = open_append(&current)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A chunk of output as record texts: each line (without its newline) is whole; the tail
/// without a newline and pieces of overlong lines are partial.
fn records(bytes: &[u8]) -> Vec<(&[u8], bool)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (line, whole, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, &rest[rest.len()..]),
        };
        let mut pieces = line.chunks(MAX_RECORD_TEXT).peekable();
        if line.is_empty() {
            out.push((line, !whole));
        }
        while let Some(piece) = pieces.next() {
            let last = pieces.peek().is_none();
            out.push((piece, !(last && whole)));
        }
        rest = after;
    }
    out
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// RFC 3339 time, as written.
    pub time: String,
    /// The stream.
    pub stream: Stream,
    /// A piece of a line (no newline after it).
    pub partial: bool,
    /// The bytes.
    pub text: Vec<u8>,
}

/// Parse one line of a log file (without its newline); None for a line that is not a record.
pub fn parse_record(line: &[u8]) -> Option<Record> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    let text = parts.next().unwrap_or_default().to_vec();
    Some(Record {
        time,
        stream,
        partial,
        text,
    })
}

/// Every record in `dir`, oldest first (the rotated file, then the current one).
pub fn read_all(dir: &Path) -> io::Result<Vec<Record>> {
    read_up_to(dir, u64::MAX)
}

/// The records of the rotated file and of the current file's first `current_len` bytes:
/// what a follower starting at `current_len` (see [`Follower::start_at`]) will not show.
pub fn read_up_to(dir: &Path, current_len: u64) -> io::Result<Vec<Record>> {
    let mut out = Vec::new();
    for (name, limit) in [(ROTATED_LOG_FILE, u64::MAX), (LOG_FILE, current_len)] {
        match fs::read(dir.join(name)) {
            Ok(bytes) => {
                let bytes = &bytes[..usize::try_from(limit)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len())];
                out.extend(bytes.split(|&b| b == b'\n').filter_map(parse_record));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The records of the last `lines` lines (a line: `P` records up to an `F` one).
pub fn tail(records: &[Record], lines: usize) -> &[Record] {
    if lines == 0 {
        return &records[records.len()..];
    }
    let mut seen = 0;
    for (i, r) in records.iter().enumerate().rev() {
        // The end of an earlier line starts the lines we keep.
        if !r.partial && i + 1 < records.len() {
            seen += 1;
            if seen == lines {
                return &records[i + 1..];
            }
        }
    }
    records
}

/// Writes records back as the container's two streams, optionally with each line led by
/// its time.
#[derive(Debug)]
pub struct Replay<O, E> {
    /// Standard output's destination.
    pub stdout: O,
    /// Standard error's destination.
    pub stderr: E,
    /// Lead each line with its time (`--timestamps`).
    pub timestamps: bool,
    /// Whether the next record of each stream starts a line.
    at_line_start: [bool; 2],
}

impl<O: Write, E: Write> Replay<O, E> {
    /// A replay into `stdout` and `stderr`.
    pub fn new(stdout: O, stderr: E, timestamps: bool) -> Self {
        Replay {
            stdout,
            stderr,
            timestamps,
            at_line_start: [true, true],
        }
    }

    /// Write one record.
    pub fn write(&mut self, r: &Record) -> io::Result<()> {
        let i = r.stream as usize;
        let w: &mut dyn Write = match r.stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        if self.timestamps && self.at_line_start[i] {
            write!(w, "{} ", r.time)?;
        }
        w.write_all(&r.text)?;
        if !r.partial {
            w.write_all(b"\n")?;
        }
        self.at_line_start[i] = !r.partial;
        w.flush()
    }
}

/// Reads a log directory as it grows, across rotations, for `fcvm logs -f`.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    file: Option<File>,
    /// Bytes read past the last newline.
    pending: Vec<u8>,
}

impl Follower {
    /// Follow `dir`; [`Follower::start_at`] says from where.
    pub fn new(dir: &Path) -> Follower {
        Follower {
            dir: dir.to_owned(),
            file: None,
            pending: Vec::new(),
        }
    }

    /// Open the current file positioned at `offset` (what was already shown).
    pub fn start_at(&mut self, offset: u64) -> io::Result<()> {
        use std::io::Seek;
        match File::open(self.dir.join(LOG_FILE)) {
            Ok(mut f) => {
                f.seek(io::SeekFrom::Start(offset))?;
                self.file = Some(f);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The records written since the last call.
    pub fn poll(&mut self) -> io::Result<Vec<Record>> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        loop {
            if self.file.is_none() {
                match File::open(self.dir.join(LOG_FILE)) {
                    Ok(f) => self.file = Some(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(e),
                }
            }
            let file = self.file.as_mut().expect("opened above");
            // Checked before reading: once the current file is another one, the writer is
            // done with this one, so reading it to its end misses nothing.
            let rotated = match fs::metadata(self.dir.join(LOG_FILE)) {
                Ok(m) => m.ino() != file.metadata()?.ino(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            self.pending.extend_from_slice(&bytes);
            if let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') {
                let whole: Vec<u8> = self.pending.drain(..=end).collect();
                out.extend(whole.split(|&b| b == b'\n').filter_map(parse_record));
            }
            if !rotated {
                return Ok(out);
            }
            self.file = None;
            self.pending.clear();
        }
    }
}

/// Size of the current log file (where `fcvm logs -f` starts following after its first read).
pub fn current_len(dir: &Path) -> u64 {
    fs::metadata(dir.join(LOG_FILE)).map_or(0, |m| m.len())
}

/// Parse a size as podman's `--log-opt max-size` takes it: bytes, or with a `k`, `m` or `g`
/// suffix (optionally followed by `b`, any case): `512k`, `10mb`, `1g`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (digits, shift) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 10),
        'm' => (&t[..t.len() - 1], 20),
        'g' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

/// A refused `--log-opt`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogOptError {
    /// Not KEY=VALUE, or a key fcvm does not know.
    #[error("--log-opt {0:?}: only max-size=SIZE is supported (e.g. max-size=10mb)")]
    Unknown(String),
    /// A size that does not parse or is too small.
    #[error(
        "--log-opt max-size={0:?}: not a size of at least 4k (bytes, or with a k, m or g suffix)"
    )]
    Size(String),
}

/// The bound of each log file from `--log-opt` occurrences (the last max-size wins;
/// [`DEFAULT_MAX_BYTES`] without one).
pub fn parse_log_opts(opts: &[String]) -> Result<u64, LogOptError> {
    let mut max = DEFAULT_MAX_BYTES;
    for opt in opts {
        match opt.split_once('=') {
            Some(("max-size", v)) => {
                max = parse_size(v)
                    .filter(|&n| n >= MIN_MAX_BYTES)
                    .ok_or_else(|| LogOptError::Size(v.to_owned()))?;
            }
            _ => return Err(LogOptError::Unknown(opt.clone())),
        }
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(dir: &Path) -> Vec<(Stream, bool, String)> {
        read_all(dir)
            .unwrap()
            .into_iter()
            .map(|r| (r.stream, r.partial, String::from_utf8(r.text).unwrap()))
            .collect()
    }

    #[test]
    fn lines_become_records_and_replay_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::create(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        w.write(Stream::Stdout, b"one\ntwo\n\nthr").unwrap();
        w.write(Stream::Stderr, b"err 1\n").unwrap();
        w.write(Stream::Stdout, b"ee\n").unwrap();
        use Stream::*;
        assert_eq!(
            texts(dir.path()),
            [
                (Stdout, false, "one".into()),
                (Stdout, false, "two".into()),
                (Stdout, false, "".into()),
                (Stdout, true, "thr".into()),
                (Stderr, false, "err 1".into()),
                (Stdout, false, "ee".into()),
            ]
        );
        let text = fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        let first = text.lines().next().unwrap();
        assert!(first.ends_with("Z stdout F one"), "{first}");
        let records = read_all(dir.path()).unwrap();
        let mut replay = Replay::new(Vec::new(), Vec::new(), false);
        for r in &records {
            replay.write(r).unwrap();
        }
        assert_eq!(replay.stdout, b"one\ntwo\n\nthree\n");
        assert_eq!(replay.stderr, b"err 1\n");
        // Timestamps lead lines, not the pieces of one.
        let mut replay = Replay::new(Vec::new(), Vec::new(), true);
        for r in &records {
            replay.write(r).unwrap();
        }
        let out = String::from_utf8(replay.stdout).unwrap();
        assert_eq!(out.lines().count(), 4);
        assert!(out.lines().all(|l| l.contains("Z ")), "{out}");
        assert!(out.lines().nth(3).unwrap().ends_with("Z three"), "{out}");
    }

    #[test]
    fn overlong_lines_are_split_into_pieces() {
        let line = vec![b'x'; MAX_RECORD_TEXT * 2 + 5];
        let mut chunk = line.clone();
        chunk.push(b'\n');
        let r = records(&chunk);
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.iter().map(|p| p.1).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert_eq!(r.iter().map(|p| p.0.len()).sum::<usize>(), line.len());
    }

    #[test]
    fn the_log_rotates_and_stays_within_twice_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::create(dir.path(), MIN_MAX_BYTES).unwrap();
        for i in 0..2000 {
            w.write(Stream::Stdout, format!("line {i:05}\n").as_bytes())
                .unwrap();
        }
        let size = |n| fs::metadata(dir.path().join(n)).unwrap().len();
        assert!(size(LOG_FILE) <= MIN_MAX_BYTES && size(ROTATED_LOG_FILE) <= MIN_MAX_BYTES);
        let all = texts(dir.path());
        // The newest lines, in order, ending with the last one written.
        assert_eq!(all.last().unwrap().2, "line 01999");
        let numbers: Vec<u32> = all.iter().map(|t| t.2[5..].parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert!(numbers.len() > 100);
    }

    #[test]
    fn tail_counts_lines_not_pieces() {
        let rec = |text: &str, partial| Record {
            time: "t".into(),
            stream: Stream::Stdout,
            partial,
            text: text.as_bytes().to_vec(),
        };
        let rs = vec![
            rec("a", false),
            rec("b1", true),
            rec("b2", false),
            rec("c", false),
        ];
        let t = |n| -> Vec<String> {
            tail(&rs, n)
                .iter()
                .map(|r| String::from_utf8(r.text.clone()).unwrap())
                .collect()
        };
        assert_eq!(t(1), ["c"]);
        assert_eq!(t(2), ["b1", "b2", "c"]);
        assert_eq!(t(3), ["a", "b1", "b2", "c"]);
        assert_eq!(t(10), ["a", "b1", "b2", "c"]);
        assert!(t(0).is_empty());
    }

    #[test]
    fn a_follower_reads_new_records_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::create(dir.path(), MIN_MAX_BYTES).unwrap();
        w.write(Stream::Stdout, b"before\n").unwrap();
        let mut f = Follower::new(dir.path());
        f.start_at(current_len(dir.path())).unwrap();
        assert!(f.poll().unwrap().is_empty());
        let mut want = Vec::new();
        for i in 0..300 {
            let line = format!("line {i:04}");
            w.write(Stream::Stderr, format!("{line}\n").as_bytes())
                .unwrap();
            want.push(line);
            if i % 50 == 0 {
                // Polled now and then, as `logs -f` does, with rotations in between.
                assert!(f.poll().is_ok());
            }
        }
        assert!(dir.path().join(ROTATED_LOG_FILE).exists());
        // Everything once, in order: start again and collect the whole run.
        let mut f = Follower::new(dir.path());
        f.start_at(0).unwrap();
        let got: Vec<String> = f
            .poll()
            .unwrap()
            .into_iter()
            .map(|r| String::from_utf8(r.text).unwrap())
            .collect();
        assert_eq!(got.last(), want.last());
        let mut seen = Vec::new();
        let mut g = Follower::new(dir.path());
        g.start_at(current_len(dir.path())).unwrap();
        for i in 0..300 {
            w.write(Stream::Stdout, format!("more {i:04}\n").as_bytes())
                .unwrap();
            if i % 7 == 0 {
                seen.extend(g.poll().unwrap());
            }
        }
        seen.extend(g.poll().unwrap());
        let nums: Vec<u32> = seen
            .iter()
            .map(|r| String::from_utf8_lossy(&r.text)[5..].parse().unwrap())
            .collect();
        assert_eq!(nums, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn sizes_parse_as_podman_spells_them() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("10mb"), Some(10 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1k"), None);
        assert_eq!(parse_log_opts(&[]), Ok(DEFAULT_MAX_BYTES));
        assert_eq!(parse_log_opts(&["max-size=64k".into()]), Ok(64 << 10));
        assert!(matches!(
            parse_log_opts(&["max-size=1k".into()]),
            Err(LogOptError::Size(_))
        ));
        let e = parse_log_opts(&["max-file=3".into()]).unwrap_err();
        assert!(e.to_string().contains("max-file=3"), "{e}");
    }
}
