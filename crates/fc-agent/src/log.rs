//! Console logging. The agent's stderr is the serial console, so every line carries a prefix and a monotonic timestamp for boot profiling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static DEBUG: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Starts the clock used in log lines.
pub fn init() {
    START.get_or_init(Instant::now);
}

/// Turns debug lines on (`fcvm.debug=1`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether debug lines are printed.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Milliseconds since [`init`].
pub fn elapsed_ms() -> u128 {
    START.get_or_init(Instant::now).elapsed().as_millis()
}

/// Prints an informational line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        eprintln!("fc-agent [{:>6} ms] {}", $crate::log::elapsed_ms(), format_args!($($arg)*))
    };
}

/// Prints a line only with `fcvm.debug=1`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::info!($($arg)*)
        }
    };
}
