//! Turning `fcvm podman run` arguments into the agent's run plan.

use std::collections::BTreeMap;

use fcvm_proto::frame::WindowSize;
use fcvm_proto::plan::{ImageSource, Plan};

use super::env::{self, EnvError};

/// Invalid container arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanArgsError {
    /// A bad `-e` item or `--env-file`.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// Both `--cmd` and a trailing command.
    #[error("give the command either after IMAGE or with --cmd, not both")]
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
    /// `-w` that is not absolute.
    #[error("invalid --workdir {0:?}: it must be an absolute path in the container")]
    Workdir(String),
    /// `--user ''` or a user with whitespace.
    #[error("invalid --user {0:?}: expected a name or uid, optionally with :group")]
    User(String),
    /// `--label` without `KEY=`.
    #[error("invalid --label {0:?}: expected KEY=VALUE")]
    Label(String),
}

/// `-e` items for `fcvm exec`, read with this host's environment.
pub fn parse_env(items: &[String]) -> Result<BTreeMap<String, String>, PlanArgsError> {
    Ok(env::container_env(&[], items, &env::ProcessEnv)?)
}

/// `--label KEY=VALUE` items.
pub fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>, PlanArgsError> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() && !item.contains('\0') => {
                Ok((k.to_owned(), v.to_owned()))
            }
            _ => Err(PlanArgsError::Label(item.clone())),
        })
        .collect()
}

/// `-w`: absolute, as podman requires.
pub fn workdir(w: Option<&str>) -> Result<Option<String>, PlanArgsError> {
    match w {
        Some(w) if !w.starts_with('/') || w.contains('\0') => {
            Err(PlanArgsError::Workdir(w.to_owned()))
        }
        w => Ok(w.map(str::to_owned)),
    }
}

/// `--user`: a name or number, optionally `:group`; podman in the guest resolves it.
pub fn user(u: Option<&str>) -> Result<Option<String>, PlanArgsError> {
    match u {
        Some(u)
            if u.is_empty()
                || u.starts_with(':')
                || u.contains(char::is_whitespace)
                || u.contains('\0') =>
        {
            Err(PlanArgsError::User(u.to_owned()))
        }
        u => Ok(u.map(str::to_owned)),
    }
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
    /// `--user`.
    pub user: Option<String>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `--entrypoint`.
    pub entrypoint: Option<String>,
    /// `--init`.
    pub init: bool,
    /// `--label`s.
    pub labels: BTreeMap<String, String>,
    /// `--privileged`.
    pub privileged: bool,
    /// The host's proxy variables (see [`fcvm_proto::plan::proxy_settings`]).
    pub proxy: BTreeMap<String, String>,
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
    plan.user = opts.user;
    plan.workdir = opts.workdir;
    plan.entrypoint = opts.entrypoint;
    plan.init = opts.init;
    plan.labels = opts.labels;
    plan.privileged = opts.privileged;
    plan.proxy = opts.proxy;
    plan
}

/// The host's wall clock for [`Plan::host_time_ns`]: nanoseconds since the Unix epoch, or
/// `None` for a clock before 1970 or past 2262 (the agent then leaves the guest's alone).
pub fn host_time_ns() -> Option<u64> {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    u64::try_from(since.as_nanos())
        .ok()
        .filter(|&ns| ns > 0 && i64::try_from(ns).is_ok())
}

/// [`fcvm_proto::plan::ENTROPY_BYTES`] fresh bytes from the host's /dev/urandom (the
/// kernel's CRNG, as `getrandom`) for [`Plan::entropy`].
pub fn host_entropy() -> std::io::Result<fcvm_proto::plan::Entropy> {
    use std::io::Read;
    let mut bytes = vec![0u8; fcvm_proto::plan::ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(fcvm_proto::plan::Entropy::new(bytes))
}

/// The plan sent with Proceed: `plan` with the host's time and fresh entropy, stamped now
/// (the agent sets the guest's clock and reseeds its CRNG with them before the container
/// starts). Without entropy (the host's /dev/urandom failed, which it does not) the agent
/// still reseeds from the guest's own pool; the warning says so.
pub fn proceed(plan: &Plan) -> Plan {
    let mut go = plan.clone();
    go.await_proceed = false;
    go.entropy = match host_entropy() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(
                "cannot read /dev/urandom for the guest ({e}): its CRNG is reseeded from its own pool only"
            );
            None
        }
    };
    go.host_time_ns = host_time_ns();
    go
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proceed_plans_carry_the_time_and_fresh_entropy() {
        let mut plan = Plan::new(ImageSource::registry("alpine"));
        plan.await_proceed = true;
        let before = host_time_ns().unwrap();
        let (a, b) = (proceed(&plan), proceed(&plan));
        let after = host_time_ns().unwrap();
        for go in [&a, &b] {
            assert!(!go.await_proceed);
            go.validate().unwrap();
            let t = go.host_time_ns.unwrap();
            assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
            assert_eq!(
                go.entropy.as_ref().unwrap().bytes().len(),
                fcvm_proto::plan::ENTROPY_BYTES
            );
        }
        assert_ne!(a.entropy, b.entropy, "two Proceeds got the same bytes");
        // The boot plan in MMDS never carries entropy.
        assert!(plan.entropy.is_none());
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
            ImageSource::registry("alpine"),
            PlanOptions {
                cmd: Some(vec!["true".into()]),
                env: [("A".to_owned(), "1".to_owned())].into(),
                tty: true,
                ..Default::default()
            },
        );
        p.validate().unwrap();
        assert_eq!(p.tty_size, Some(WindowSize { rows: 24, cols: 80 }));
        assert_eq!(p.env.get("A").map(String::as_str), Some("1"));
        let p = build(ImageSource::registry("alpine"), PlanOptions::default());
        assert_eq!(p.tty_size, None);
        assert_eq!(p.cmd, None);
    }

    #[test]
    fn run_flags_travel_in_the_plan() {
        let p = build(
            ImageSource::registry("alpine"),
            PlanOptions {
                user: user(Some("1000:1000")).unwrap(),
                workdir: workdir(Some("/tmp")).unwrap(),
                entrypoint: Some("/bin/sh".into()),
                init: true,
                labels: parse_labels(&["a=1".into(), "b=x=y".into(), "c=".into()]).unwrap(),
                privileged: true,
                ..Default::default()
            },
        );
        p.validate().unwrap();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["user"], "1000:1000");
        assert_eq!(json["workdir"], "/tmp");
        assert_eq!(json["entrypoint"], "/bin/sh");
        assert_eq!(json["init"], true);
        assert_eq!(json["privileged"], true);
        assert_eq!(json["labels"]["b"], "x=y");
        assert_eq!(json["labels"]["c"], "");
    }

    #[test]
    fn run_flags_are_checked_before_boot() {
        assert_eq!(
            workdir(Some("tmp")),
            Err(PlanArgsError::Workdir("tmp".into()))
        );
        assert_eq!(workdir(None), Ok(None));
        for bad in ["", ":1000", "a b"] {
            assert_eq!(
                user(Some(bad)),
                Err(PlanArgsError::User(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(user(Some("nobody")), Ok(Some("nobody".into())));
        for bad in ["novalue", "=v"] {
            assert_eq!(
                parse_labels(&[bad.into()]),
                Err(PlanArgsError::Label(bad.into()))
            );
        }
    }
}
