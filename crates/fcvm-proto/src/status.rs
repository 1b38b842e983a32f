//! Lines the agent sends on the status port ([`crate::vsock::STATUS_PORT`]).
//!
//! One connection per boot; each message is one UTF-8 line ending in `\n`:
//!
//! | line            | meaning |
//! |-----------------|---------|
//! | `ready`         | the container is running and the exec server accepts connections |
//! | `exit:<code>`   | the container ended with `<code>` (0-255; 128+N when killed by signal N); all output has been flushed and the output connection closed |
//! | `error:<text>`  | the agent could not run the container (bad plan, image load failed, ...); an `exit:` line follows |
//!
//! Unknown lines must be ignored by the host so the agent can add messages later.

/// Longest status line accepted, including the newline.
pub const MAX_STATUS_LINE: usize = 4096;

/// One status message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The container runs and exec requests are served.
    Ready,
    /// The container exited with this code.
    Exit(i32),
    /// The agent failed; the text says why.
    Error(String),
}

/// Errors parsing a status line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatusError {
    /// The line is not one of the known messages.
    #[error("Unknown status line {0:?}")]
    Unknown(String),
    /// `exit:` was followed by something that is not an integer.
    #[error("Malformed exit code in status line {0:?}")]
    BadExitCode(String),
}

impl Status {
    /// The line as sent on the wire, with its newline. Newlines inside an error text are
    /// replaced so one message stays one line.
    pub fn to_line(&self) -> String {
        match self {
            Status::Ready => "ready\n".to_owned(),
            Status::Exit(code) => format!("exit:{code}\n"),
            Status::Error(text) => {
                let mut t: String = text.replace(['\n', '\r'], " ");
                t.truncate(MAX_STATUS_LINE - "error:\n".len());
                format!("error:{t}\n")
            }
        }
    }

    /// Parses one line (with or without its newline).
    pub fn parse(line: &str) -> Result<Self, StatusError> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line == "ready" {
            return Ok(Status::Ready);
        }
        if let Some(code) = line.strip_prefix("exit:") {
            return code
                .parse::<i32>()
                .map(Status::Exit)
                .map_err(|_| StatusError::BadExitCode(line.to_owned()));
        }
        if let Some(text) = line.strip_prefix("error:") {
            return Ok(Status::Error(text.to_owned()));
        }
        Err(StatusError::Unknown(line.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for s in [
            Status::Ready,
            Status::Exit(0),
            Status::Exit(137),
            Status::Error("no image".into()),
        ] {
            assert_eq!(Status::parse(&s.to_line()), Ok(s));
        }
    }

    #[test]
    fn error_text_stays_one_line() {
        let line = Status::Error("a\nb".into()).to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(Status::parse(&line), Ok(Status::Error("a b".into())));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            Status::parse("exit:x"),
            Err(StatusError::BadExitCode("exit:x".into()))
        );
        assert!(matches!(
            Status::parse("readyy"),
            Err(StatusError::Unknown(_))
        ));
        assert!(matches!(Status::parse(""), Err(StatusError::Unknown(_))));
    }
}
