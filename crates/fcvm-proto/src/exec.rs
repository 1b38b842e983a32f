//! Exec requests: the first frame on an exec connection ([`crate::vsock::EXEC_PORT`]).
//!
//! Sequence after the hybrid-vsock handshake (`CONNECT 4998` / `OK n`):
//!
//! 1. host → guest: one [`crate::frame::Frame::Exec`] frame with an [`ExecRequest`].
//! 2. guest → host: `Stdout`/`Stderr` frames while the command runs (only `Stdout` with a TTY);
//!    host → guest: `Stdin`, `Eof`, `Resize`, `Signal` frames at any time.
//! 3. guest → host: exactly one `Exit(code)` frame, or one `Error(text)` frame when the command
//!    could not be started; then the guest closes the connection.
//!
//! If the host closes its side early, the guest kills the command (SIGKILL) and cleans up.

use std::collections::BTreeMap;

use crate::frame::WindowSize;
use crate::plan::validate_env;

/// What to run and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; must not be empty.
    pub command: Vec<String>,
    /// Run inside the container (`podman exec`) rather than in the VM itself.
    #[serde(default)]
    pub in_container: bool,
    /// Keep standard input open and fed by `Stdin` frames.
    #[serde(default)]
    pub interactive: bool,
    /// Give the command a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size (with `tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty_size: Option<WindowSize>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

/// Why an exec request is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecRequestError {
    /// `command` is empty.
    #[error("Exec request has an empty command")]
    EmptyCommand,
    /// An argument contains a NUL byte, which cannot be passed to execve.
    #[error("Exec argument {0:?} contains a NUL byte")]
    NulInArgument(String),
    /// An environment variable is invalid.
    #[error(transparent)]
    Env(#[from] crate::plan::PlanError),
}

impl ExecRequest {
    /// Checks what deserialization cannot.
    pub fn validate(&self) -> Result<(), ExecRequestError> {
        if self.command.is_empty() {
            return Err(ExecRequestError::EmptyCommand);
        }
        if let Some(a) = self.command.iter().find(|a| a.contains('\0')) {
            return Err(ExecRequestError::NulInArgument(a.clone()));
        }
        validate_env(&self.env)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_stable() {
        let r: ExecRequest =
            serde_json::from_str(r#"{"command":["ls"],"in_container":true}"#).unwrap();
        assert_eq!(r.command, vec!["ls"]);
        assert!(r.in_container && !r.tty && !r.interactive);
        assert!(serde_json::from_str::<ExecRequest>(r#"{"command":["ls"],"bogus":1}"#).is_err());
    }

    #[test]
    fn validation() {
        assert_eq!(
            ExecRequest::default().validate(),
            Err(ExecRequestError::EmptyCommand)
        );
        let nul = ExecRequest {
            command: vec!["a\0b".into()],
            ..Default::default()
        };
        assert!(matches!(
            nul.validate(),
            Err(ExecRequestError::NulInArgument(_))
        ));
        let mut env = ExecRequest {
            command: vec!["x".into()],
            ..Default::default()
        };
        env.env.insert("A=B".into(), "1".into());
        assert!(matches!(env.validate(), Err(ExecRequestError::Env(_))));
    }
}
