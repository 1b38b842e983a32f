//! `fcvm logs`, `fcvm wait` and `fcvm kill`: a container VM's output, its exit code, and
//! signals to its container, by name, whether its run is in the foreground or detached.

use std::io::Write;
use std::time::Duration;

use crate::commands::exec::{self, ExecError, ExecOptions, Target};
use crate::logs::{self, Follower, Replay};
use crate::paths::Paths;
use crate::state::{Store, StoreError, VmRecord};

/// How often `logs -f` and `wait` look again.
const POLL: Duration = Duration::from_millis(200);

/// Why `logs`, `wait` or `kill` failed.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// No such VM, or the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Not a container VM.
    #[error("{0} is not a container VM; logs, wait and kill work on `fcvm podman run` VMs")]
    NotContainer(String),
    /// A VM from before logs were kept.
    #[error("{0} keeps no log (it was started by an fcvm without container logs)")]
    NoLog(String),
    /// Reading the log.
    #[error("cannot read the log of {0}")]
    Read(String, #[source] std::io::Error),
    /// Writing our output.
    #[error("cannot write the log out")]
    Write(#[source] std::io::Error),
    /// A signal name or number that is not one.
    #[error("unknown signal {0:?} (use a name such as TERM, SIGUSR1, or a number)")]
    Signal(String),
    /// kill of a VM that is not running.
    #[error("container VM {0} is not running (it ended); nothing to signal")]
    NotRunning(String),
    /// The VM was removed (`--rm`) before its exit code was read.
    #[error("container VM {0} ended and was removed (--rm); its exit code was not kept")]
    Removed(String),
    /// The signal could not be delivered.
    #[error("cannot signal the container of {0}")]
    Kill(String, #[source] Box<ExecError>),
    /// `podman kill` in the guest refused.
    #[error("the guest could not signal the container of {0} (podman kill exited with {1})")]
    KillFailed(String, i32),
}

fn container(store: &Store, name: &str) -> Result<VmRecord, LogsError> {
    let record = store.find_by_name(name)?;
    if !record.runs_container() {
        return Err(LogsError::NotContainer(name.to_owned()));
    }
    Ok(record)
}

/// What `fcvm logs` shows.
#[derive(Debug, Clone, Default)]
pub struct LogsOptions {
    /// Keep printing new output until the container ends (`-f`).
    pub follow: bool,
    /// Only the last N lines.
    pub tail: Option<usize>,
    /// Lead each line with its RFC 3339 time.
    pub timestamps: bool,
}

/// Print the container's output: its stdout to `out`, its stderr to `err`.
pub async fn logs(
    store: &Store,
    name: &str,
    opts: &LogsOptions,
    out: impl Write,
    err: impl Write,
) -> Result<(), LogsError> {
    let record = container(store, name)?;
    let Some(dir) = record.log_dir.clone() else {
        return Err(LogsError::NoLog(name.to_owned()));
    };
    let read_err = |e| LogsError::Read(name.to_owned(), e);
    // The length first: what is appended after it is the follower's to show.
    let shown = logs::current_len(&dir);
    let records = logs::read_up_to(&dir, shown).map_err(read_err)?;
    let mut replay = Replay::new(out, err, opts.timestamps);
    let start = opts
        .tail
        .map_or(0, |n| records.len() - logs::tail(&records, n).len());
    for r in records.iter().skip(start) {
        replay.write(r).map_err(LogsError::Write)?;
    }
    if !opts.follow {
        return Ok(());
    }
    let mut follower = Follower::new(&dir);
    follower.start_at(shown).map_err(read_err)?;
    loop {
        let ended = !store.get(&record.id)?.is_some_and(|r| r.is_running());
        for r in follower.poll().map_err(read_err)? {
            replay.write(&r).map_err(LogsError::Write)?;
        }
        // The owner writes the last output before it records the end.
        if ended {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Wait until the container of `name` ends and return its exit code.
pub async fn wait(store: &Store, name: &str) -> Result<i32, LogsError> {
    let record = container(store, name)?;
    loop {
        match store.get(&record.id)? {
            Some(r) if r.exit_code.is_some() => return Ok(r.exit_code.unwrap_or_default()),
            Some(r) if !r.is_running() => {
                // Failed, or its owner died without a code: podman reports -1 then too.
                return Ok(-1);
            }
            Some(_) => tokio::time::sleep(POLL).await,
            None => return Err(LogsError::Removed(name.to_owned())),
        }
    }
}

/// The signal number of `spec`: a name (`TERM`, `SIGUSR1`, any case) or a number.
pub fn parse_signal(spec: &str) -> Result<i32, LogsError> {
    let bad = || LogsError::Signal(spec.to_owned());
    if let Ok(n) = spec.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|s| s as i32)
            .map_err(|_| bad());
    }
    let upper = spec.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| bad())
}

/// Send `signal` to the container of `name`, through podman in its VM.
pub async fn kill(paths: &Paths, name: &str, signal: i32) -> Result<(), LogsError> {
    let store = Store::open(paths)?;
    let record = container(&store, name)?;
    if !record.is_running() {
        return Err(LogsError::NotRunning(name.to_owned()));
    }
    let opts = ExecOptions {
        target: Target::Name(name.to_owned()),
        in_vm: true,
        interactive: false,
        tty: false,
        env: Vec::new(),
        workdir: None,
        // podman prints the container's name; only its errors are the user's business.
        command: vec![
            "sh".into(),
            "-c".into(),
            "exec podman kill --signal \"$1\" \"$2\" >/dev/null".into(),
            "sh".into(),
            signal.to_string(),
            fcvm_proto::plan::CONTAINER_NAME.into(),
        ],
    };
    match exec::exec(paths, &opts).await {
        Ok(0) => Ok(()),
        Ok(code) => Err(LogsError::KillFailed(name.to_owned(), code)),
        Err(e) => Err(LogsError::Kill(name.to_owned(), Box::new(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_or_number() {
        assert_eq!(parse_signal("USR1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("sigusr1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("SIGKILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("15").unwrap(), libc::SIGTERM);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
        let e = parse_signal("").unwrap_err();
        assert!(e.to_string().contains("unknown signal"), "{e}");
    }
}
