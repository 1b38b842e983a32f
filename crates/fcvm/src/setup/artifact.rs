//! Machinery shared by the content-addressed setup artifacts (guest rootfs, guest kernel).
//!
//! Every artifact follows the same life cycle:
//!
//! 1. Hash every input that can change the result (`InputHash`); the hash is part of the
//!    file name, so "is it built?" is a single `stat` and a changed input never reuses a
//!    stale file.
//! 2. Take an exclusive `flock` on the destination directory (`lock_dir`) so two
//!    concurrent `fcvm setup` runs build once: the second waits, then finds the file.
//! 3. Build in a private scratch directory under `tmp/` (`Scratch`), which sits on the
//!    same file system as the destination so publishing is a `rename`.
//! 4. Publish with `publish`: rename, then fsync the directory. Until that rename
//!    nothing is visible under the final name, so a failure or a crash never leaves a
//!    half-made artifact where a reader would find it.
//!
//! External tools run through `run_streaming`, which merges their stdout and stderr into
//! one ordered stream of lines for the progress display and keeps the tail for the error
//! message when they fail.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::fsutil::{io_at, PathIoError};

/// How many output lines of a failed tool are kept for the error message.
const TAIL_LINES: usize = 80;

/// Hash of a build's inputs. Each field is fed as a length-prefixed name and value, so two
/// different input sets can never serialise to the same byte stream.
pub(crate) struct InputHash(Sha256);

impl InputHash {
    /// A hash for artifacts of `kind`; the kind keeps a rootfs and a kernel with the same
    /// inputs apart.
    pub(crate) fn new(kind: &str) -> Self {
        let mut hash = Self(Sha256::new());
        hash.field("kind", kind);
        hash
    }

    /// Add one named input.
    pub(crate) fn field(&mut self, name: &str, value: impl AsRef<[u8]>) -> &mut Self {
        let value = value.as_ref();
        for part in [name.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// The hex digest.
    pub(crate) fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// The prefix of a digest used in file names: 16 hex digits (64 bits) is plenty to tell
/// apart the handful of artifacts one host ever builds.
pub(crate) fn short(digest: &str) -> &str {
    &digest[..digest.len().min(16)]
}

/// An exclusive lock on a directory, released when dropped (or when the process dies).
#[derive(Debug)]
pub(crate) struct DirLock {
    _lock: Flock<File>,
}

/// Lock `dir` exclusively. When someone else holds it, `on_wait` is called once before
/// blocking, so the caller can tell the user why nothing is happening.
///
/// The lock is on the directory itself rather than on a lock file, so it leaves nothing
/// behind in the directory.
pub(crate) fn lock_dir(dir: &Path, on_wait: impl FnOnce()) -> io::Result<DirLock> {
    let open = || File::open(dir);
    match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            on_wait();
            Flock::lock(open()?, FlockArg::LockExclusive)
                .map(|lock| DirLock { _lock: lock })
                .map_err(|(_, errno)| io::Error::from(errno))
        }
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

/// A build directory under `tmp/`, removed (with everything in it) when dropped.
#[derive(Debug)]
pub(crate) struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Create `tmp_dir/<prefix><random>`.
    pub(crate) fn create(tmp_dir: &Path, prefix: &str) -> io::Result<Self> {
        fs::create_dir_all(tmp_dir)?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(tmp_dir)?;
        // Ownership moves to `Scratch`, whose removal refuses to cross mount points.
        Ok(Self { path: dir.keep() })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove build directory");
        }
    }
}

/// Remove leftovers of earlier builds that died without cleaning up (SIGKILL, power loss):
/// every entry of `tmp_dir` whose name starts with `prefix`. Only call this while holding
/// the lock that serialises those builds, so no live build is touched.
pub(crate) fn remove_stale(tmp_dir: &Path, prefix: &str) -> io::Result<()> {
    let entries = match fs::read_dir(tmp_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing a stale build directory");
            if entry.file_type()?.is_dir() {
                remove_tree(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// `remove_dir_all` that first makes sure nothing is mounted inside `path`: deleting
/// through a leftover bind mount of `/dev` or `/proc` would delete the host's files.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let mounts = mounts_under(path)?;
    if !mounts.is_empty() {
        let list: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
        return Err(io::Error::other(format!(
            "refusing to delete {} because file systems are still mounted inside it ({}); unmount them first",
            path.display(),
            list.join(", ")
        )));
    }
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Mount points at or below `path`, from `/proc/self/mountinfo`.
pub(crate) fn mounts_under(path: &Path) -> io::Result<Vec<PathBuf>> {
    let path = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo_points(&info)
        .into_iter()
        .filter(|m| m.starts_with(&path))
        .collect())
}

/// Field 5 of each mountinfo line, with the kernel's octal escapes (`\040` for a space)
/// undone.
fn parse_mountinfo_points(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match escape {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Make `src` visible as `dst` in one step. Both must be on the same file system. The
/// file is synced first, and the directory after, so a crash right after cannot expose an
/// empty or truncated artifact under the final name.
pub(crate) fn publish(src: &Path, dst: &Path) -> io::Result<()> {
    File::open(src)?.sync_all()?;
    fs::rename(src, dst)?;
    if let Some(dir) = dst.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Publish an artifact together with its companion file (a kernel's `.config`, a rootfs's
/// package manifest): the companion first, then the artifact, removing the companion again
/// if the artifact cannot be published, so a companion never describes a missing artifact.
pub(crate) fn publish_with_companion(
    companion: (&Path, &Path),
    artifact: (&Path, &Path),
) -> Result<(), PathIoError> {
    publish(companion.0, companion.1).map_err(io_at("cannot publish", companion.1))?;
    if let Err(e) = publish(artifact.0, artifact.1) {
        let _ = fs::remove_file(companion.1);
        return Err(io_at("cannot publish", artifact.1)(e));
    }
    Ok(())
}

/// Sum of allocated bytes and number of inodes of a directory tree (not following
/// symlinks), i.e. what `du` would report; used to size file system images.
pub(crate) fn tree_usage(root: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            bytes += meta.blocks() * 512;
            inodes += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Why an external tool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Not installed.
    #[error("`{tool}` was not found on PATH or in /usr/sbin, /sbin; install it with `apt-get install {package}`")]
    Missing {
        /// The program.
        tool: String,
        /// Debian package that provides it.
        package: String,
    },
    /// Installed but too old.
    #[error("`{tool}` {found} is too old, fcvm needs {need} or newer; upgrade with `apt-get install {package}`")]
    TooOld {
        /// The program.
        tool: String,
        /// Version found.
        found: String,
        /// Minimum version.
        need: String,
        /// Debian package that provides it.
        package: String,
    },
    /// The version could not be read.
    #[error("could not tell the version of `{tool}` from `{output}`")]
    UnknownVersion {
        /// The program.
        tool: String,
        /// What it printed.
        output: String,
    },
    /// A development file (header) is missing.
    #[error("{file} is missing; install it with `apt-get install {package}`")]
    MissingFile {
        /// The file looked for.
        file: String,
        /// Debian package that provides it.
        package: String,
    },
}

/// Find `tool` on PATH, then in the sbin directories (a non-root PATH often lacks them).
pub(crate) fn find_tool(tool: &str, package: &str) -> Result<PathBuf, ToolError> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path_var)
        .chain(extra)
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| ToolError::Missing {
            tool: tool.into(),
            package: package.into(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Run `tool` with `args` and check that the first `x.y[.z]` in its output is at least
/// `need`. Returns the version found.
pub(crate) fn require_version(
    tool: &Path,
    args: &[&str],
    need: (u32, u32, u32),
    package: &str,
) -> Result<(u32, u32, u32), ToolError> {
    let name = tool
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let output = Command::new(tool).args(args).stdin(Stdio::null()).output();
    let text = match output {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            return Err(ToolError::Missing {
                tool: name,
                package: package.into(),
            })
        }
    };
    let found = parse_version(&text).ok_or_else(|| ToolError::UnknownVersion {
        tool: name.clone(),
        output: text.trim().to_string(),
    })?;
    if found < need {
        let show = |v: (u32, u32, u32)| format!("{}.{}.{}", v.0, v.1, v.2);
        return Err(ToolError::TooOld {
            tool: name,
            found: show(found),
            need: show(need),
            package: package.into(),
        });
    }
    Ok(found)
}

/// The first dotted version number (`1.3.5`, `1.47.0`, `4.3`) in `text`.
pub(crate) fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find_map(|word| {
            let mut parts = word.split('.').filter(|p| !p.is_empty());
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            Some((major, minor, patch))
        })
}

/// A tool that exited unsuccessfully, with the end of what it printed.
#[derive(Debug)]
pub struct RunFailure {
    /// The program name.
    pub program: String,
    /// How it ended (`exit status: 1`, `signal: 9`), or why it could not start.
    pub status: String,
    /// The last lines of its merged stdout and stderr.
    pub tail: Vec<String>,
}

impl RunFailure {
    /// The lines worth showing: the tool's own error lines when it marked any (`E:` from
    /// apt and mmdebstrap, `error:` from compilers, `***` from make), else the last lines.
    pub fn excerpt(&self) -> Vec<&str> {
        const MAX: usize = 20;
        let marked: Vec<&str> = self
            .tail
            .iter()
            .map(String::as_str)
            .filter(|line| {
                let lower = line.to_ascii_lowercase();
                line.starts_with("E: ") || lower.contains("error") || line.contains("***")
            })
            .collect();
        let lines: Vec<&str> = if marked.is_empty() {
            self.tail.iter().map(String::as_str).collect()
        } else {
            marked
        };
        lines[lines.len().saturating_sub(MAX)..].to_vec()
    }
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` failed ({})", self.program, self.status)?;
        for line in self.excerpt() {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RunFailure {}

/// Run `cmd` to completion with stdout and stderr merged into one pipe, calling `on_line`
/// for each line as it arrives. Succeeds only on exit status 0.
pub(crate) fn run_streaming(
    mut cmd: Command,
    mut on_line: impl FnMut(&str),
) -> Result<(), RunFailure> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let fail = |status: String, tail: Vec<String>| RunFailure {
        program: program.clone(),
        status,
        tail,
    };
    let (reader, writer) =
        io::pipe().map_err(|e| fail(format!("cannot create a pipe: {e}"), vec![]))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| fail(format!("cannot duplicate a pipe: {e}"), vec![]))?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let spawned = cmd.spawn();
    // The Command still owns our copies of the pipe's write end; drop it so the read below
    // sees end-of-file when the child (and its children) exit.
    drop(cmd);
    let mut child = spawned.map_err(|e| fail(format!("cannot start it: {e}"), vec![]))?;

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(reader).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        on_line(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child.wait().map_err(|e| {
        fail(
            format!("cannot wait for it: {e}"),
            tail.iter().cloned().collect(),
        )
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(status.to_string(), tail.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_hash_separates_fields() {
        let digest = |pairs: &[(&str, &str)]| {
            let mut h = InputHash::new("t");
            for (k, v) in pairs {
                h.field(k, v);
            }
            h.finish()
        };
        // Moving bytes between name and value, or between fields, changes the digest.
        assert_ne!(digest(&[("ab", "c")]), digest(&[("a", "bc")]));
        assert_ne!(digest(&[("a", "b"), ("c", "d")]), digest(&[("a", "bcd")]));
        assert_eq!(digest(&[("a", "b")]), digest(&[("a", "b")]));
        assert_eq!(digest(&[("a", "b")]).len(), 64);
        let mut other_kind = InputHash::new("u");
        other_kind.field("a", "b");
        assert_ne!(other_kind.finish(), digest(&[("a", "b")]));
    }

    #[test]
    fn versions_are_found_in_tool_banners() {
        assert_eq!(parse_version("mmdebstrap 1.3.5\n"), Some((1, 3, 5)));
        assert_eq!(
            parse_version("mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0"),
            Some((1, 47, 0))
        );
        assert_eq!(parse_version("podman version 4.3"), Some((4, 3, 0)));
        assert_eq!(parse_version("no digits here"), None);
        assert_eq!(parse_version("build 7"), None);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        let info =
            "36 35 98:0 /mnt1 /mnt\\040with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /dev rw - devtmpfs udev rw\n";
        assert_eq!(
            parse_mountinfo_points(info),
            vec![PathBuf::from("/mnt with space"), PathBuf::from("/dev")]
        );
    }

    #[test]
    fn missing_tool_names_its_package() {
        let err = find_tool("fcvm-no-such-tool-here", "fcvm-pkg").unwrap_err();
        assert!(
            err.to_string().contains("apt-get install fcvm-pkg"),
            "{err}"
        );
    }

    #[test]
    fn run_streaming_merges_streams_in_order_and_keeps_the_tail() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; echo E: broken >&2; exit 3"]);
        let mut seen = Vec::new();
        let err = run_streaming(cmd, |l| seen.push(l.to_string())).unwrap_err();
        assert_eq!(seen, ["one", "two", "E: broken"]);
        assert!(err.status.contains('3'), "{}", err.status);
        assert_eq!(err.excerpt(), ["E: broken"]);
        assert!(err.to_string().contains("`sh` failed"));

        let mut ok = Command::new("sh");
        ok.args(["-c", "echo fine"]);
        run_streaming(ok, |_| {}).unwrap();
    }

    #[test]
    fn scratch_is_removed_and_stale_entries_go() {
        let tmp = tempfile::tempdir().unwrap();
        let kept;
        {
            let scratch = Scratch::create(tmp.path(), "thing-").unwrap();
            fs::write(scratch.path().join("f"), b"x").unwrap();
            kept = scratch.path().to_path_buf();
            assert!(kept
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("thing-"));
        }
        assert!(!kept.exists());

        fs::create_dir_all(tmp.path().join("thing-old/sub")).unwrap();
        fs::write(tmp.path().join("thing-file"), b"x").unwrap();
        fs::write(tmp.path().join("other"), b"x").unwrap();
        remove_stale(tmp.path(), "thing-").unwrap();
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["other"]);
    }

    #[test]
    fn dir_lock_excludes_a_second_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock_dir(tmp.path(), || panic!("nobody holds it yet")).unwrap();
        // A second open file description on the same directory must not get the lock.
        let second = Flock::lock(
            File::open(tmp.path()).unwrap(),
            FlockArg::LockExclusiveNonblock,
        );
        assert!(second.is_err());
        drop(first);
        let third = Flock::lock(
            File::open(tmp.path()).unwrap(),
            FlockArg::LockExclusiveNonblock,
        );
        assert!(third.is_ok());
    }

    #[test]
    fn tree_usage_counts_files() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        fs::write(tmp.path().join("d/f"), vec![1u8; 10_000]).unwrap();
        let (bytes, inodes) = tree_usage(tmp.path()).unwrap();
        assert_eq!(inodes, 2);
        assert!(bytes >= 10_000, "{bytes}");
    }
}
