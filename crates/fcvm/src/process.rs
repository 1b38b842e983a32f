//! Identifying processes across time: a pid plus its start time, so a recycled pid is
//! never mistaken for the process we started.

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A specific process: pid and kernel start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Process id.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_time: u64,
}

impl ProcessRef {
    /// The process with this pid as it exists now, if it does.
    pub fn of_pid(pid: u32) -> Option<ProcessRef> {
        start_time(pid).map(|start_time| ProcessRef { pid, start_time })
    }

    /// The calling process.
    pub fn current() -> ProcessRef {
        Self::of_pid(std::process::id()).expect("/proc/self/stat is readable")
    }

    /// Whether this exact process still exists (and is not a zombie).
    pub fn is_alive(&self) -> bool {
        match stat_fields(self.pid) {
            Some(fields) => {
                fields.start_time == self.start_time && fields.state != 'Z' && fields.state != 'X'
            }
            None => false,
        }
    }

    /// Send `signal` if this exact process still exists. Returns whether it was sent.
    pub fn signal(&self, signal: Signal) -> bool {
        self.is_alive() && kill(Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and wait for it to go.
    /// A process that is PID 1 of its own PID namespace (a jailed Firecracker) ignores
    /// SIGTERM sent from outside (it has no handler), so it gets SIGKILL at once.
    pub fn terminate(&self, grace: Duration) {
        if self.is_namespace_init() {
            self.signal(Signal::SIGKILL);
            self.wait_gone(Duration::from_secs(5));
            return;
        }
        if !self.signal(Signal::SIGTERM) {
            return;
        }
        if self.wait_gone(grace) {
            return;
        }
        self.signal(Signal::SIGKILL);
        self.wait_gone(Duration::from_secs(5));
    }

    /// Whether the process is PID 1 of a PID namespace below ours (`NSpid` ends in 1).
    pub fn is_namespace_init(&self) -> bool {
        let Ok(status) = fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return false;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|v| {
                let ids: Vec<&str> = v.split_whitespace().collect();
                ids.len() > 1 && ids.last() == Some(&"1")
            })
    }

    /// Poll until the process is gone or `timeout` passes; returns whether it is gone.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

struct StatFields {
    state: char,
    start_time: u64,
}

fn stat_fields(pid: u32) -> Option<StatFields> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid).map(|f| f.start_time)
}

/// Parse state and start time out of a `/proc/<pid>/stat` line. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3; start time is field 22, i.e. 18 further.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(StatFields { state, start_time })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let f = parse_stat(line).unwrap();
        assert_eq!(f.state, 'S');
        assert_eq!(f.start_time, 987654);
    }

    #[test]
    fn current_process_is_alive_and_a_recycled_pid_is_not() {
        let me = ProcessRef::current();
        assert!(me.is_alive());
        let impostor = ProcessRef {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!impostor.is_alive());
    }

    #[test]
    fn exited_child_is_not_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let r = ProcessRef::of_pid(child.id()).unwrap();
        assert!(r.is_alive());
        r.signal(Signal::SIGKILL);
        child.wait().unwrap();
        assert!(!r.is_alive());
    }
}
