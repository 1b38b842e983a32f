//! The library's typed errors. Every variant says what failed and, where there is one, the fix.

use std::path::PathBuf;

/// Anything that makes fcvm-testhost itself fail (exit status 125).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program we run is not installed.
    #[error("{program} not found: apt-get install {package}")]
    MissingProgram {
        /// The program looked for in `PATH`.
        program: String,
        /// The Debian package that has it.
        package: String,
    },
    /// A host program ran but failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// What was being done.
        what: String,
        /// Its exit status and stderr.
        detail: String,
    },
    /// Fetching the pinned L1 kernel package failed.
    #[error("fetching the L1 kernel package {package}={version} failed: {detail}\n  fix: run `apt-get update`; if the package is no longer in the archive, update the pin (PACKAGE, VERSION, SHA256) in {pin_file}")]
    KernelFetch {
        /// Package name.
        package: String,
        /// Pinned version.
        version: String,
        /// What went wrong.
        detail: String,
        /// The source file with the pin.
        pin_file: String,
    },
    /// A file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "reading".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A kernel module is not where the package should have it.
    #[error("kernel module {0} is required but not in the kernel package")]
    MissingModule(String),
    /// A file we read (kernel module, busybox) is not what it should be.
    #[error("{}: {why}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Not enough free memory for the L1 VM.
    #[error("the emulated host needs {want_mib} MiB (--mem) but MemAvailable is {avail_mib} MiB: lower --mem or free memory")]
    NotEnoughMemory {
        /// Requested.
        want_mib: u64,
        /// Available.
        avail_mib: u64,
    },
    /// A command-line value is unusable.
    #[error("{0}")]
    Usage(String),
    /// QEMU or the L1 guest failed; the console log has been printed.
    #[error("{0}")]
    Vm(String),
    /// The control protocol broke.
    #[error(transparent)]
    Proto(#[from] crate::proto::ProtoError),
}

impl Error {
    /// Wraps an I/O error with the action and path.
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
