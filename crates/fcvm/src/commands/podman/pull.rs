//! The guest's `podman pull`, as the host shows it.
//!
//! The agent relays every line podman's pull writes
//! ([`fcvm_proto::status::Status::PullProgress`]: `Trying to pull ...`, `Copying blob
//! sha256:...`, `Copying config ...`, `Writing manifest ...`). On a terminal they drive a
//! spinner that shows the latest line, the blobs podman has started so far and the time, and
//! that ends with one `pulled` line. In a pipe nothing is shown: stderr keeps only fcvm's own
//! notices and stdout only the container's output. Nothing is invented: podman writes to
//! the agent's pipe, where it draws no byte counts, so none are shown.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The spinner of one pull (or nothing, off a terminal).
pub struct PullDisplay {
    reference: String,
    terminal: bool,
    bar: Option<ProgressBar>,
    started: Option<Instant>,
    blobs: usize,
}

impl PullDisplay {
    /// The display of a pull of `reference`, on stderr when it is a terminal.
    pub fn new(reference: &str) -> Self {
        Self::with_terminal(reference, std::io::stderr().is_terminal())
    }

    /// As [`PullDisplay::new`], told whether stderr is a terminal.
    pub fn with_terminal(reference: &str, terminal: bool) -> Self {
        PullDisplay {
            reference: reference.to_owned(),
            terminal,
            bar: None,
            started: None,
            blobs: 0,
        }
    }

    /// One line of podman's pull output.
    pub fn line(&mut self, line: &str) {
        self.started.get_or_insert_with(Instant::now);
        if line.starts_with("Copying blob") {
            self.blobs += 1;
        }
        if !self.terminal {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} pulling {prefix} [{elapsed}] {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(self.reference.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        bar.set_message(status_text(self.blobs, line));
    }

    /// The pull is over (the image is ready, or the agent reported an error or an exit):
    /// the spinner goes; after a pull that ended well, one line says so.
    pub fn finish(&mut self, pulled: bool) {
        let Some(bar) = self.bar.take() else {
            return;
        };
        bar.finish_and_clear();
        if pulled {
            let secs = self
                .started
                .map(|t| t.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            // `\r\n`: the terminal may be raw already (`-it`), where `\n` alone does not
            // return to the first column.
            eprint!(
                "fcvm: pulled {} ({} {}, {secs:.1} s)\r\n",
                self.reference,
                self.blobs,
                if self.blobs == 1 { "blob" } else { "blobs" }
            );
        }
    }

    /// Whether podman reported anything (a pull happened, rather than an image found in the
    /// guest's storage).
    pub fn started(&self) -> bool {
        self.started.is_some()
    }
}

impl Drop for PullDisplay {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The spinner's text: the blobs so far and podman's latest line.
fn status_text(blobs: usize, line: &str) -> String {
    let line = line.trim();
    match blobs {
        0 => line.to_owned(),
        n => format!("{n} {}: {line}", if n == 1 { "blob" } else { "blobs" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_a_terminal_nothing_is_drawn_but_the_pull_is_counted() {
        let mut d = PullDisplay::with_terminal("reg/a:1", false);
        assert!(!d.started());
        for l in [
            "Trying to pull reg/a:1...",
            "Getting image source signatures",
            "Copying blob sha256:aaa",
            "Copying blob sha256:bbb",
            "Copying config sha256:ccc",
        ] {
            d.line(l);
        }
        assert!(d.bar.is_none());
        assert!(d.started());
        assert_eq!(d.blobs, 2);
        d.finish(true);
    }

    #[test]
    fn the_text_is_podman_s_line_with_the_blob_count() {
        assert_eq!(
            status_text(0, "Trying to pull reg/a:1..."),
            "Trying to pull reg/a:1..."
        );
        assert_eq!(
            status_text(1, "Copying blob sha256:aaa "),
            "1 blob: Copying blob sha256:aaa"
        );
        assert_eq!(
            status_text(3, "Writing manifest to image destination"),
            "3 blobs: Writing manifest to image destination"
        );
    }
}
