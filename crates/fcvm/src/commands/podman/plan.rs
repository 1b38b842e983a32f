//! Turning `fcvm podman run` arguments into the agent's run plan.

use std::collections::BTreeMap;

use fcvm_proto::frame::WindowSize;
use fcvm_proto::plan::{ImageSource, Plan};

/// Invalid container arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanArgsError {
    /// `--env` item without `=`, or with an empty name.
    #[error(
        "invalid --env {0:?}: expected NAME=VALUE (several may be joined with commas: A=1,B=2)"
    )]
    EnvSyntax(String),
    /// A name that a process environment cannot hold.
    #[error("invalid --env name {0:?}: names must not contain '=', ',' or NUL bytes")]
    EnvName(String),
    /// Both `--cmd` and a trailing command.
    #[error("give the command either after `--` or with --cmd, not both")]
    TwoCommands,
    /// `--cmd` that does not split into words.
    #[error("cannot parse --cmd {cmd:?}: {reason}")]
    CmdSyntax {
        /// The string.
        cmd: String,
        /// Why.
        reason: String,
    },
    /// `--cmd ""`.
    #[error("--cmd is empty; omit it to run the image's default command")]
    EmptyCmd,
    /// A NUL byte in an argument.
    #[error("command argument {0:?} contains a NUL byte")]
    Nul(String),
}

/// Parse every `--env` occurrence. Each may hold a comma-separated list; a comma starts a
/// new variable only when what follows looks like `NAME=`, so `PATH=/a,/b` keeps its comma.
pub fn parse_env(items: &[String]) -> Result<BTreeMap<String, String>, PlanArgsError> {
    let mut env = BTreeMap::new();
    for item in items {
        for part in split_env_list(item) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| PlanArgsError::EnvSyntax(part.clone()))?;
            if name.is_empty() {
                return Err(PlanArgsError::EnvSyntax(part.clone()));
            }
            if !is_env_name(name) {
                return Err(PlanArgsError::EnvName(name.to_owned()));
            }
            if value.contains('\0') {
                return Err(PlanArgsError::Nul(part.clone()));
            }
            env.insert(name.to_owned(), value.to_owned());
        }
    }
    Ok(env)
}

fn is_env_name(name: &str) -> bool {
    !name.contains(['=', ',', '\0']) && !name.contains(char::is_whitespace)
}

fn split_env_list(item: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for piece in item.split(',') {
        let starts_new = match piece.split_once('=') {
            Some((name, _)) => !name.is_empty() && is_env_name(name),
            None => false,
        };
        match parts.last_mut() {
            Some(last) if !starts_new => {
                last.push(',');
                last.push_str(piece);
            }
            _ => parts.push(piece.to_owned()),
        }
    }
    parts
}

/// The command to run: the trailing arguments, or `--cmd` split like a shell would
/// (quotes and backslashes, no expansion), or `None` for the image's default.
pub fn command(
    trailing: &[String],
    cmd: Option<&str>,
) -> Result<Option<Vec<String>>, PlanArgsError> {
    let words = match (trailing.is_empty(), cmd) {
        (false, Some(_)) => return Err(PlanArgsError::TwoCommands),
        (false, None) => trailing.to_vec(),
        (true, Some(c)) => {
            let words = shell_words::split(c).map_err(|e| PlanArgsError::CmdSyntax {
                cmd: c.to_owned(),
                reason: e.to_string(),
            })?;
            if words.is_empty() {
                return Err(PlanArgsError::EmptyCmd);
            }
            words
        }
        (true, None) => return Ok(None),
    };
    if let Some(bad) = words.iter().find(|w| w.contains('\0')) {
        return Err(PlanArgsError::Nul(bad.clone()));
    }
    Ok(Some(words))
}

/// Options of the plan that come from the command line.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Command override.
    pub cmd: Option<Vec<String>>,
    /// Container environment.
    pub env: BTreeMap<String, String>,
    /// `-i`.
    pub interactive: bool,
    /// `-t`.
    pub tty: bool,
    /// Terminal size for `-t`.
    pub tty_size: Option<WindowSize>,
    /// Guest hostname.
    pub hostname: Option<String>,
}

/// The plan for `image` with `opts`.
pub fn build(image: ImageSource, opts: PlanOptions) -> Plan {
    let mut plan = Plan::new(image);
    plan.cmd = opts.cmd;
    plan.env = opts.env;
    plan.interactive = opts.interactive;
    plan.tty = opts.tty;
    plan.tty_size = opts
        .tty
        .then(|| opts.tty_size.unwrap_or(WindowSize { rows: 24, cols: 80 }));
    plan.hostname = opts.hostname;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(items: &[&str]) -> Result<Vec<(String, String)>, PlanArgsError> {
        let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        parse_env(&items).map(|m| m.into_iter().collect())
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_repeated_and_comma_lists() {
        assert_eq!(
            env(&["A=1", "B=2,C=3", "D="]).unwrap(),
            kv(&[("A", "1"), ("B", "2"), ("C", "3"), ("D", "")])
        );
        assert_eq!(
            env(&["PATH=/a,/b,X=y=z"]).unwrap(),
            kv(&[("PATH", "/a,/b"), ("X", "y=z")])
        );
        assert_eq!(env(&["A=1", "A=2"]).unwrap(), kv(&[("A", "2")]));
        // A comma not followed by NAME= belongs to the value.
        assert_eq!(env(&["A=1,=2"]).unwrap(), kv(&[("A", "1,=2")]));
        assert_eq!(
            env(&["MSG=hello world"]).unwrap(),
            kv(&[("MSG", "hello world")])
        );
    }

    #[test]
    fn env_rejects_bad_syntax() {
        for bad in ["NOEQUALS", "=1", ",A=1"] {
            assert!(
                matches!(env(&[bad]), Err(PlanArgsError::EnvSyntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(env(&["A B=1"]), Err(PlanArgsError::EnvName(_))));
        let msg = env(&["NOEQUALS"]).unwrap_err().to_string();
        assert!(msg.contains("NAME=VALUE"), "{msg}");
    }

    #[test]
    fn trailing_command_or_cmd_string() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(command(&[], None).unwrap(), None);
        assert_eq!(
            command(&t(&["echo", "a b"]), None).unwrap(),
            Some(t(&["echo", "a b"]))
        );
        assert_eq!(
            command(&[], Some("sh -c 'echo \"x y\"; exit 3'")).unwrap(),
            Some(t(&["sh", "-c", "echo \"x y\"; exit 3"]))
        );
        assert_eq!(
            command(&t(&["x"]), Some("y")),
            Err(PlanArgsError::TwoCommands)
        );
        assert_eq!(command(&[], Some("  ")), Err(PlanArgsError::EmptyCmd));
        assert!(matches!(
            command(&[], Some("echo 'unterminated")),
            Err(PlanArgsError::CmdSyntax { .. })
        ));
    }

    #[test]
    fn plan_carries_options_and_validates() {
        let p = build(
            ImageSource::Registry {
                reference: "alpine".into(),
            },
            PlanOptions {
                cmd: Some(vec!["true".into()]),
                env: parse_env(&["A=1".into()]).unwrap(),
                tty: true,
                ..Default::default()
            },
        );
        p.validate().unwrap();
        assert_eq!(p.tty_size, Some(WindowSize { rows: 24, cols: 80 }));
        assert_eq!(p.env.get("A").map(String::as_str), Some("1"));
        let p = build(
            ImageSource::Registry {
                reference: "alpine".into(),
            },
            PlanOptions::default(),
        );
        assert_eq!(p.tty_size, None);
        assert_eq!(p.cmd, None);
    }
}
