//! The container's environment from `-e/--env` and `--env-file`, read as podman reads them.
//!
//! `-e` items:
//! - `NAME=VALUE` sets NAME (the value may hold `=` and `,`);
//! - `NAME` takes this host's value, and is skipped when the host has none (podman);
//! - `NAME*` takes every host variable whose name starts with NAME (podman);
//! - a comma list `A=1,B=2` (fcvm's own shorthand, podman has none) is split only when every
//!   comma-separated piece is `NAME=VALUE` with no further `=` in its value. So
//!   `PATH=/a,/b` and `OPTS=x=1,y=2` stay one variable each; a value that itself looks like
//!   such a list (`A=1,B=2` meant as one value) needs `--env-file`.
//!
//! `--env-file` lines (docker's format, which podman reads the same way for one-line values):
//! leading blanks are ignored; blank lines and lines starting with `#` are skipped; `NAME=VALUE`
//! takes VALUE verbatim up to the end of the line (quotes and `#` are part of it, a trailing CR
//! is dropped); `NAME` and `NAME*` read the host as `-e` does; `export NAME=VALUE` is accepted
//! (podman). Files are read in order, then `-e` items, later ones winning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A bad `-e` item or `--env-file`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// `-e =x` or `-e ''`.
    #[error("invalid --env {0:?}: expected NAME=VALUE, NAME (this host's value) or NAME*")]
    Syntax(String),
    /// A name that a process environment cannot hold.
    #[error(
        "invalid --env name {0:?}: names must not be empty nor contain '=', ',', whitespace or NUL"
    )]
    Name(String),
    /// A NUL byte in a value.
    #[error("the value of --env {0} contains a NUL byte")]
    Nul(String),
    /// The file cannot be read.
    #[error("--env-file {}: {reason}", path.display())]
    FileRead {
        /// The file.
        path: PathBuf,
        /// Why (the I/O error's text).
        reason: String,
    },
    /// A line of the file is not `NAME=VALUE`, `NAME` or `NAME*`.
    #[error("--env-file {}:{line}: {reason}: {text:?}", path.display())]
    FileLine {
        /// The file.
        path: PathBuf,
        /// Its line number (from 1).
        line: usize,
        /// The line.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Where `NAME` and `NAME*` items look values up: the host's environment, or a fake in tests.
pub trait HostEnv {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
    /// Every variable (name, value).
    fn all(&self) -> Vec<(String, String)>;
}

/// This process's environment.
pub struct ProcessEnv;

impl HostEnv for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
    }
    fn all(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect()
    }
}

/// A fixed environment (tests, and callers that must not read the process's).
impl HostEnv for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
    fn all(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The environment from `files` (in order), then `items` (`-e`), later ones winning.
pub fn container_env(
    files: &[PathBuf],
    items: &[String],
    host: &dyn HostEnv,
) -> Result<BTreeMap<String, String>, EnvError> {
    let mut env = BTreeMap::new();
    for path in files {
        let text = std::fs::read(path).map_err(|e| EnvError::FileRead {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let text = String::from_utf8(text).map_err(|_| EnvError::FileRead {
            path: path.clone(),
            reason: "not UTF-8 text".into(),
        })?;
        parse_env_file(path, &text, host, &mut env)?;
    }
    parse_env_items(items, host, &mut env)?;
    Ok(env)
}

/// Add the `-e` items to `env`.
pub fn parse_env_items(
    items: &[String],
    host: &dyn HostEnv,
    env: &mut BTreeMap<String, String>,
) -> Result<(), EnvError> {
    for item in items {
        for part in split_env_list(item) {
            if part.is_empty() || part.starts_with('=') {
                return Err(EnvError::Syntax(part.to_owned()));
            }
            match part.split_once('=') {
                Some((name, value)) => set(env, name, value)?,
                None => from_host(env, part, host).map_err(EnvError::Name)?,
            }
        }
    }
    Ok(())
}

/// Add the variables of an env file's `text` (read from `path`, for messages) to `env`.
pub fn parse_env_file(
    path: &Path,
    text: &str,
    host: &dyn HostEnv,
    env: &mut BTreeMap<String, String>,
) -> Result<(), EnvError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.split('\n').enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason| EnvError::FileLine {
            path: path.to_owned(),
            line: i + 1,
            text: raw.to_owned(),
            reason,
        };
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        match line.split_once('=') {
            Some(("", _)) => return Err(bad("no variable name before '='")),
            Some((name, value)) => {
                if !is_env_name(name) {
                    return Err(bad("the name contains whitespace, ',' or NUL"));
                }
                set(env, name, value).map_err(|_| bad("the value contains a NUL byte"))?;
            }
            None => from_host(env, line.trim_end(), host)
                .map_err(|_| bad("expected NAME=VALUE, NAME or NAME*"))?,
        }
    }
    Ok(())
}

fn set(env: &mut BTreeMap<String, String>, name: &str, value: &str) -> Result<(), EnvError> {
    if !is_env_name(name) {
        return Err(EnvError::Name(name.to_owned()));
    }
    if value.contains('\0') {
        return Err(EnvError::Nul(name.to_owned()));
    }
    env.insert(name.to_owned(), value.to_owned());
    Ok(())
}

/// `NAME` or `NAME*` from the host; a name the host does not have is skipped, as podman does.
/// Err(name) when it is not a valid name.
fn from_host(
    env: &mut BTreeMap<String, String>,
    item: &str,
    host: &dyn HostEnv,
) -> Result<(), String> {
    if let Some(prefix) = item.strip_suffix('*') {
        if !prefix.is_empty() && !is_env_name(prefix) {
            return Err(item.to_owned());
        }
        for (k, v) in host.all() {
            if k.starts_with(prefix) && is_env_name(&k) && !v.contains('\0') {
                env.insert(k, v);
            }
        }
        return Ok(());
    }
    if !is_env_name(item) {
        return Err(item.to_owned());
    }
    if let Some(v) = host.get(item) {
        env.insert(item.to_owned(), v);
    }
    Ok(())
}

/// A name a process environment holds and the list syntax cannot confuse.
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', ',', '\0']) && !name.contains(char::is_whitespace)
}

/// `A=1,B=2` → [`A=1`, `B=2`] only when every piece is NAME=VALUE with no other `=`;
/// anything else is one item.
fn split_env_list(item: &str) -> Vec<&str> {
    if !item.contains(',') {
        return vec![item];
    }
    let pieces: Vec<&str> = item.split(',').collect();
    let is_pair = |p: &&str| match p.split_once('=') {
        Some((name, value)) => is_env_name(name) && !value.contains('='),
        None => false,
    };
    if pieces.iter().all(is_pair) {
        pieces
    } else {
        vec![item]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> BTreeMap<String, String> {
        [
            ("HOME", "/root"),
            ("FCVM_A", "1"),
            ("FCVM_B", "two words"),
            ("OTHER", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn items(list: &[&str]) -> Result<Vec<(String, String)>, EnvError> {
        let items: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        let mut env = BTreeMap::new();
        parse_env_items(&items, &host(), &mut env)?;
        Ok(env.into_iter().collect())
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn items_set_repeat_and_split_only_plain_pair_lists() {
        assert_eq!(
            items(&["A=1", "B=2,C=3", "D="]).unwrap(),
            kv(&[("A", "1"), ("B", "2"), ("C", "3"), ("D", "")])
        );
        assert_eq!(items(&["A=1", "A=2"]).unwrap(), kv(&[("A", "2")]));
        // Values with commas stay whole unless every piece is a plain NAME=VALUE.
        assert_eq!(
            items(&["OPTS=x=1,y=2"]).unwrap(),
            kv(&[("OPTS", "x=1,y=2")])
        );
        assert_eq!(items(&["PATH=/a,/b"]).unwrap(), kv(&[("PATH", "/a,/b")]));
        assert_eq!(
            items(&["PATH=/a,/b,X=y=z"]).unwrap(),
            kv(&[("PATH", "/a,/b,X=y=z")])
        );
        assert_eq!(items(&["A=1,=2"]).unwrap(), kv(&[("A", "1,=2")]));
        assert_eq!(
            items(&["MSG=hello world"]).unwrap(),
            kv(&[("MSG", "hello world")])
        );
    }

    #[test]
    fn a_bare_name_takes_the_host_value_or_is_skipped() {
        assert_eq!(
            items(&["HOME", "NOT_ON_HOST"]).unwrap(),
            kv(&[("HOME", "/root")])
        );
        assert_eq!(
            items(&["FCVM_*"]).unwrap(),
            kv(&[("FCVM_A", "1"), ("FCVM_B", "two words")])
        );
        // An explicit value wins over an earlier host lookup, and the other way round.
        assert_eq!(items(&["HOME", "HOME=/x"]).unwrap(), kv(&[("HOME", "/x")]));
        assert_eq!(
            items(&["HOME=/x", "HOME"]).unwrap(),
            kv(&[("HOME", "/root")])
        );
    }

    #[test]
    fn items_reject_what_no_environment_holds() {
        for bad in ["=1", ""] {
            assert!(matches!(items(&[bad]), Err(EnvError::Syntax(_))), "{bad:?}");
        }
        assert!(matches!(items(&["A B=1"]), Err(EnvError::Name(_))));
        assert!(matches!(items(&["A B"]), Err(EnvError::Name(_))));
        assert!(matches!(items(&["A=\0"]), Err(EnvError::Nul(_))));
        let msg = items(&["=1"]).unwrap_err().to_string();
        assert!(msg.contains("NAME=VALUE"), "{msg}");
    }

    fn file(text: &str) -> Result<Vec<(String, String)>, EnvError> {
        let mut env = BTreeMap::new();
        parse_env_file(Path::new("vars.env"), text, &host(), &mut env)?;
        Ok(env.into_iter().collect())
    }

    #[test]
    fn env_file_lines_as_docker_reads_them() {
        let text = "# a comment\n\n   \nA=1\nQ=\"quoted\"\nS='single'\nH=a#b\nE=\n\
                    export X=y\nHOME\nMISSING\nFCVM_*\r\nC=crlf\r\n\tT=tab  \n   # indented comment";
        assert_eq!(
            file(text).unwrap(),
            kv(&[
                ("A", "1"),
                ("C", "crlf"),
                ("E", ""),
                ("FCVM_A", "1"),
                ("FCVM_B", "two words"),
                ("H", "a#b"),
                ("HOME", "/root"),
                ("Q", "\"quoted\""),
                ("S", "'single'"),
                ("T", "tab  "),
                ("X", "y"),
            ])
        );
        // A byte-order mark is not part of the first name.
        assert_eq!(file("\u{feff}A=1").unwrap(), kv(&[("A", "1")]));
    }

    #[test]
    fn env_file_errors_name_the_file_and_line() {
        let err = file("A=1\nB = spaced\n").unwrap_err();
        assert!(
            matches!(&err, EnvError::FileLine { line: 2, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("--env-file vars.env:2: "), "{msg}");
        assert!(matches!(
            file("=x"),
            Err(EnvError::FileLine { line: 1, .. })
        ));
        assert!(matches!(
            file("ok=1\nnot a name"),
            Err(EnvError::FileLine { line: 2, .. })
        ));
    }

    #[test]
    fn files_come_first_and_items_win() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.env");
        std::fs::write(&f, "A=file\nB=file\n").unwrap();
        let env = container_env(&[f], &["B=flag".into()], &host()).unwrap();
        assert_eq!(
            env.into_iter().collect::<Vec<_>>(),
            kv(&[("A", "file"), ("B", "flag")])
        );
        let missing = dir.path().join("nope.env");
        let err = container_env(std::slice::from_ref(&missing), &[], &host()).unwrap_err();
        assert!(matches!(err, EnvError::FileRead { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("nope.env") && msg.contains("No such file"),
            "{msg}"
        );
    }
}
