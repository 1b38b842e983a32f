use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use fcvm::cli::{self, args::Cli};

fn main() -> ExitCode {
    // Internal entry points are recognised before clap, so they are never listed in help
    // nor suggested for a typo.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .get(1)
        .is_some_and(|a| a == fcvm::snapshot::guard::GUARD_SUBCOMMAND)
    {
        let Some(socket) = argv.get(2) else {
            return ExitCode::from(2);
        };
        return block_on(async {
            fcvm::snapshot::guard::run_guard(std::path::Path::new(socket)).await;
            Ok(ExitCode::SUCCESS)
        });
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayVersion => {
            // Versions of the agent and Firecracker too, as found now; never an error.
            print!("{}", cli::version::report(&fcvm::paths::Paths::from_env()));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(cli::usage_exit_code(&e, &argv));
        }
    };
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
        // Colour only for a person at a terminal, never into pipes and files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    block_on(cli::dispatch(cli))
}

fn block_on(work: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
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
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fcvm: error: {}", fcvm::report::chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
