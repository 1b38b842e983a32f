use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use fcvm::cli::{self, args::Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("FCVM_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    // The VMM is spawned from the thread that runs `block_on` (this one), which lives as
    // long as fcvm: PR_SET_PDEATHSIG on a foreground VMM is tied to it.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fcvm: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fcvm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
