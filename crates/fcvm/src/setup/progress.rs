//! Progress display for the long `fcvm setup` steps (rootfs, kernel).
//!
//! On a terminal each step is a spinner line that turns into a check mark with the step's
//! elapsed time. When stderr is not a terminal (CI logs, pipes) the same steps come out as
//! one plain line when they start and one when they end, so logs stay readable and
//! timestamps can be compared between runs. Nothing is ever written to stdout: callers may
//! be printing the artifact path there for scripts.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a setup step reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A spinner when stderr is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Plain lines on stderr, even on a terminal.
    Plain,
    /// Nothing at all (tests, library callers with their own display).
    Quiet,
}

enum Sink {
    Spinner(Option<ProgressBar>),
    Plain,
    Quiet,
}

/// Reporter for one setup task made of named steps.
pub(crate) struct Progress {
    task: &'static str,
    sink: Sink,
    step: Option<(String, Instant)>,
    started: Instant,
}

impl Progress {
    /// Reporter for `task` (shown as the prefix, e.g. "setup rootfs").
    pub(crate) fn new(task: &'static str, mode: ProgressMode) -> Self {
        let sink = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => Sink::Spinner(None),
            ProgressMode::Auto | ProgressMode::Plain => Sink::Plain,
            ProgressMode::Quiet => Sink::Quiet,
        };
        Self {
            task,
            sink,
            step: None,
            started: Instant::now(),
        }
    }

    /// Close the current step (if any) as done and start `name`.
    pub(crate) fn step(&mut self, name: impl Into<String>) {
        let name = name.into();
        if self
            .step
            .as_ref()
            .is_some_and(|(current, _)| *current == name)
        {
            return;
        }
        self.end_step(true);
        match &mut self.sink {
            Sink::Spinner(bar) => {
                let new = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                new.set_style(running_style());
                new.set_prefix(name.clone());
                new.enable_steady_tick(Duration::from_millis(120));
                *bar = Some(new);
            }
            Sink::Plain => eprintln!("fcvm {}: {name} ...", self.task),
            Sink::Quiet => {}
        }
        self.step = Some((name, Instant::now()));
    }

    /// Show what the current step is doing right now (terminal only; plain logs would
    /// drown in it).
    pub(crate) fn detail(&self, text: &str) {
        if let Sink::Spinner(Some(bar)) = &self.sink {
            bar.set_message(text.trim().to_string());
        }
    }

    /// A one-off notice that should appear in every mode except quiet.
    pub(crate) fn note(&self, text: &str) {
        match &self.sink {
            Sink::Spinner(Some(bar)) => bar.println(format!("  {text}")),
            Sink::Spinner(None) | Sink::Plain => eprintln!("fcvm {}: {text}", self.task),
            Sink::Quiet => {}
        }
    }

    /// Close the last step as done and print a summary with the total time.
    pub(crate) fn finish(mut self, summary: &str) {
        self.end_step(true);
        let total = fmt_secs(self.started.elapsed());
        match self.sink {
            Sink::Spinner(_) | Sink::Plain => eprintln!("fcvm {}: {summary} ({total})", self.task),
            Sink::Quiet => {}
        }
    }

    fn end_step(&mut self, ok: bool) {
        let Some((name, since)) = self.step.take() else {
            return;
        };
        let took = fmt_secs(since.elapsed());
        match &mut self.sink {
            Sink::Spinner(bar) => {
                if let Some(bar) = bar.take() {
                    bar.set_style(
                        ProgressStyle::with_template("  {prefix} {msg}").expect("valid template"),
                    );
                    let mark = if ok { "\u{2714}" } else { "\u{2718}" };
                    bar.set_prefix(format!("{mark} {name}"));
                    bar.finish_with_message(if ok {
                        took
                    } else {
                        format!("failed after {took}")
                    });
                }
            }
            Sink::Plain => {
                let how = if ok { "done" } else { "failed" };
                eprintln!("fcvm {}: {name} {how} ({took})", self.task);
            }
            Sink::Quiet => {}
        }
    }
}

impl Drop for Progress {
    /// A reporter dropped with a step still open means the task failed part-way.
    fn drop(&mut self) {
        self.end_step(false);
    }
}

fn running_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {elapsed:>3} {wide_msg:.dim}")
        .expect("valid template")
}

/// `1.2 s` below a minute, `3 min 05 s` above.
pub(crate) fn fmt_secs(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_human_sized() {
        assert_eq!(fmt_secs(Duration::from_millis(1234)), "1.2 s");
        assert_eq!(fmt_secs(Duration::from_secs(185)), "3 min 05 s");
    }
}
