//! The `fcvm` command line: parse, dispatch to `commands`, print. `anyhow` lives here only.

pub mod args;
pub mod podman;
pub mod snapshot;
pub mod version;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::commands::{self, ls};
use crate::doctor;
use crate::paths::Paths;
use crate::setup;
use crate::state::Store;
use args::{Cli, Command, SetupStep};

/// Run the parsed command line and return the process exit code.
pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let paths = match &cli.base_dir {
        Some(dir) => Paths::new(dir),
        None => Paths::from_env(),
    };
    // Generated from the grammar alone: no state is read or reaped.
    match &cli.command {
        Command::Completions(a) => return cmd_completions(a.shell),
        Command::Man(a) => return cmd_man(&a.dir),
        _ => {}
    }
    crate::vm::jail::set_opt_out(cli.no_jailer);
    reap_stale(&paths);
    match cli.command {
        Command::Setup(a) => cmd_setup(&paths, a.step),
        Command::Doctor(a) => cmd_doctor(&paths, a.json),
        Command::Run(a) => cmd_run(&paths, a).await,
        Command::Stop(a) => cmd_stop(&paths, a).await,
        Command::Ls(a) => cmd_ls(&paths, a),
        Command::Podman(c) => podman::podman(&paths, c).await,
        Command::Exec(a) => podman::exec(&paths, a).await,
        Command::Snapshot(c) => snapshot::snapshot(&paths, c).await,
        Command::Snapshots(c) => snapshot::snapshots(&paths, c).await,
        Command::Ps(a) => cmd_ps(&paths, a),
        Command::Inspect(a) => cmd_inspect(&paths, a),
        Command::Rm(a) => cmd_rm(&paths, a).await,
        Command::Logs(a) => cmd_logs(&paths, a).await,
        Command::Wait(a) => cmd_wait(&paths, a).await,
        Command::Kill(a) => cmd_kill(&paths, a).await,
        Command::Attach(a) => cmd_attach(&paths, a).await,
        Command::Completions(_) | Command::Man(_) => unreachable!("handled above"),
    }
}

fn records(paths: &Paths) -> Result<Vec<crate::state::VmRecord>> {
    Ok(if paths.state_dir().exists() {
        Store::open(paths)?.list()?
    } else {
        vec![]
    })
}

fn cmd_ps(paths: &Paths, a: args::PsArgs) -> Result<ExitCode> {
    let entries = commands::ps::entries(&records(paths)?, a.all);
    match a.format {
        args::PsFormat::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        args::PsFormat::Table => print!("{}", commands::ps::table(&entries)),
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_inspect(paths: &Paths, a: args::InspectArgs) -> Result<ExitCode> {
    let store = Store::open(paths)?;
    let found = a
        .names
        .iter()
        .map(|n| store.find_by_name(n))
        .collect::<Result<Vec<_>, _>>()?;
    println!("{}", serde_json::to_string_pretty(&found)?);
    Ok(ExitCode::SUCCESS)
}

/// Run `one` for each of `names` (podman's multi-name commands): each success prints what
/// `one` returns, each failure its error; the exit code is `failed` when any failed.
async fn for_each_name<E, Fut>(
    names: &[String],
    failed: u8,
    mut one: impl FnMut(String) -> Fut,
) -> ExitCode
where
    E: std::error::Error + 'static,
    Fut: std::future::Future<Output = std::result::Result<String, E>>,
{
    let mut any_failed = false;
    for name in names {
        match one(name.clone()).await {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("fcvm: error: {}", crate::report::chain(&e));
                any_failed = true;
            }
        }
    }
    if any_failed {
        ExitCode::from(failed)
    } else {
        ExitCode::SUCCESS
    }
}

async fn cmd_rm(paths: &Paths, a: args::RmArgs) -> Result<ExitCode> {
    let store = Store::open(paths)?;
    let grace = Duration::from_secs(a.time);
    Ok(for_each_name(&a.names, 1, |name| {
        let store = &store;
        async move {
            let report = commands::ps::rm(store, &name, a.force, grace).await?;
            for f in &report.teardown.failures {
                eprintln!("warning: {f}; the next fcvm command retries it");
            }
            Ok::<_, commands::ps::RmError>(name)
        }
    })
    .await)
}

async fn cmd_logs(paths: &Paths, a: args::LogsArgs) -> Result<ExitCode> {
    let opts = commands::logs::LogsOptions {
        follow: a.follow,
        tail: a.tail,
        timestamps: a.timestamps,
    };
    let store = Store::open(paths)?;
    let (out, err) = (std::io::stdout().lock(), std::io::stderr().lock());
    match commands::logs::logs(&store, &a.name, &opts, out, err).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A closed pipe (`fcvm logs NAME | head`) is the reader's choice, not an error.
        Err(commands::logs::LogsError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("fcvm: error: {}", crate::report::chain(&e));
            Ok(ExitCode::from(1))
        }
    }
}

async fn cmd_wait(paths: &Paths, a: args::WaitArgs) -> Result<ExitCode> {
    let store = Store::open(paths)?;
    Ok(for_each_name(&a.names, 125, |name| {
        let store = &store;
        async move {
            commands::logs::wait(store, &name)
                .await
                .map(|c| c.to_string())
        }
    })
    .await)
}

async fn cmd_kill(paths: &Paths, a: args::KillArgs) -> Result<ExitCode> {
    let signal = match commands::logs::parse_signal(&a.signal) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fcvm: error: {e}");
            return Ok(ExitCode::from(125));
        }
    };
    Ok(for_each_name(&a.names, 125, |name| async move {
        commands::logs::kill(paths, &name, signal)
            .await
            .map(|()| name)
    })
    .await)
}

async fn cmd_attach(paths: &Paths, a: args::AttachArgs) -> Result<ExitCode> {
    use commands::attach::AttachEnd;
    match commands::attach::attach(paths, &a.name, &a.detach_keys).await {
        Ok(AttachEnd::Exited(code)) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Ok(AttachEnd::Detached) => {
            eprintln!(
                "\nfcvm: detached from {0}; it keeps running (`fcvm attach {0}` to come back)",
                a.name
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("fcvm: error: {}", crate::report::chain(&e));
            Ok(ExitCode::from(125))
        }
    }
}

/// The completion script for `shell`, generated from the clap grammar.
pub fn completion_script(shell: args::CompletionShell) -> Vec<u8> {
    use clap::CommandFactory;
    let shell = match shell {
        args::CompletionShell::Bash => clap_complete::Shell::Bash,
        args::CompletionShell::Zsh => clap_complete::Shell::Zsh,
        args::CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "fcvm", &mut out);
    out
}

fn cmd_completions(shell: args::CompletionShell) -> Result<ExitCode> {
    std::io::stdout().write_all(&completion_script(shell))?;
    Ok(ExitCode::SUCCESS)
}

/// Write `fcvm.1` and a page per subcommand (`fcvm-podman-run.1`, ...) into `dir`; returns
/// fcvm's pages now in `dir`.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)?;
    let mut written: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("fcvm") && n.ends_with(".1"))
        })
        .collect();
    written.sort();
    Ok(written)
}

fn cmd_man(dir: &std::path::Path) -> Result<ExitCode> {
    let pages = write_man_pages(dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    eprintln!("{} man pages in {}", pages.len(), dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Every command first cleans up after VMs whose owner died (e.g. a SIGKILLed fcvm).
fn reap_stale(paths: &Paths) {
    if !paths.state_dir().exists() {
        return;
    }
    match Store::open(paths).and_then(|s| s.reap_stale()) {
        Ok(reaped) => {
            for r in reaped {
                if let Some(record) = &r.report.record {
                    tracing::info!("cleaned up after VM {} ({:?})", record.name, r.reason);
                }
                for f in &r.report.failures {
                    tracing::warn!("{f}; the next fcvm command retries it");
                }
            }
        }
        Err(e) => tracing::warn!(
            "could not check for stale VMs: {}",
            crate::report::chain(&e)
        ),
    }
}

/// `fcvm setup [STEP]` (also `podman run --setup`, with every step).
pub(crate) fn cmd_setup(paths: &Paths, step: Option<SetupStep>) -> Result<ExitCode> {
    let all = step.is_none();
    if all || matches!(step, Some(SetupStep::Firecracker)) {
        let done = setup::firecracker::ensure(paths).context("setting up Firecracker")?;
        let verb = if done.installed_now {
            "installed"
        } else {
            "found"
        };
        eprintln!(
            "firecracker {} {} ({})\njailer      {} {} ({})",
            done.firecracker.version,
            verb,
            done.firecracker.path.display(),
            done.jailer.version,
            verb,
            done.jailer.path.display()
        );
    }
    if let Some(SetupStep::Storage { size }) = &step {
        let bytes = setup::storage::parse_size(size)?;
        match setup::storage::ensure(paths, bytes) {
            Ok(setup::storage::StorageOutcome::AlreadyReflink) => eprintln!(
                "storage: {} already supports reflinks; nothing to do",
                paths.base().display()
            ),
            Ok(setup::storage::StorageOutcome::LoopBtrfs { image, mkfs_version }) => eprintln!(
                "storage: {} could not reflink; created a {size} btrfs in {} ({mkfs_version}) and mounted it there (loop). Not persistent: add `{} {} btrfs loop 0 0` to /etc/fstab to keep it across reboots",
                paths.base().display(),
                image.display(),
                image.display(),
                paths.base().display()
            ),
            Err(e @ setup::storage::StorageError::NoBtrfsProgs { .. }) => {
                eprintln!("warning: {e}");
                return Ok(ExitCode::from(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(SetupStep::Ksm) = &step {
        let was = setup::storage::enable_ksm().context("writing /sys/kernel/mm/ksm/run")?;
        eprintln!(
            "ksm: {}; VMs and clones started with --ksm auto (default) or on now share identical pages (ksmd CPU cost grows with /sys/kernel/mm/ksm/pages_to_scan)",
            if was { "already running" } else { "started" }
        );
    }
    if all || matches!(step, Some(SetupStep::Probe)) {
        let path = setup::probe::ensure(paths).context("writing the probe kernel")?;
        eprintln!("probe kernel {}", path.display());
    }
    if all || matches!(step, Some(SetupStep::Agent)) {
        let agent = setup::initrd::find_agent_binary()?;
        let initrd =
            setup::initrd::ensure_initrd(paths, &agent).context("packing the agent initrd")?;
        eprintln!(
            "agent initrd {} (from {})",
            initrd.path.display(),
            agent.display()
        );
    }
    if all || matches!(step, Some(SetupStep::Rootfs)) {
        let image = setup::rootfs::ensure_rootfs(paths, &setup::rootfs::RootfsOptions::default())
            .context("building the guest root filesystem")?;
        eprintln!("rootfs {}", image.display());
    }
    if matches!(step, Some(SetupStep::Kernel)) || (all && doctor::check(paths).guest_kernels_boot) {
        let kernel = setup::kernel::ensure_kernel(paths, &setup::kernel::KernelOptions::default())
            .context("building the guest kernel")?;
        eprintln!("kernel {}", kernel.display());
    } else if all {
        eprintln!("kernel: skipped, this host cannot boot guest kernels (see `fcvm doctor`); build it anyway with `fcvm setup kernel`");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_doctor(paths: &Paths, json: bool) -> Result<ExitCode> {
    let report = doctor::check(paths);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.ok_for_firecracker() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn cmd_run(paths: &Paths, a: args::RunArgs) -> Result<ExitCode> {
    let req = commands::run::RunRequest {
        name: a.name,
        kernel: a.kernel,
        initrd: a.initrd,
        rootfs: a.rootfs,
        boot_args: a.boot_args,
        vcpus: a.cpu,
        mem_mib: a.mem,
        track_dirty_pages: a.track_dirty_pages,
        detach: a.detach,
        network: match a.network {
            args::NetworkMode::None => commands::run::RunNetwork::None,
            args::NetworkMode::Tap => commands::run::RunNetwork::Tap,
            args::NetworkMode::Bridged => commands::run::RunNetwork::Bridged,
        },
        publish: a.publish,
        ksm: a.ksm.enabled(),
    };
    let mut stdout = std::io::stdout();
    let outcome = commands::run::run(paths, &req, &mut stdout).await?;
    if req.detach {
        let r = &outcome.record;
        println!("{}", r.name);
        eprintln!(
            "VM {} ({}) running, firecracker pid {}; console: {}; stop with `fcvm stop {}`",
            r.name,
            r.id,
            r.pid(),
            r.console_log
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            r.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    stdout.flush()?;
    if let Some(sig) = outcome.interrupted {
        eprintln!("fcvm: interrupted; VM {} stopped", outcome.record.name);
        return Ok(ExitCode::from((128 + sig).clamp(0, 255) as u8));
    }
    Ok(ExitCode::from(
        outcome.exit_code.unwrap_or(1).clamp(0, 255) as u8
    ))
}

async fn cmd_stop(paths: &Paths, a: args::StopArgs) -> Result<ExitCode> {
    let store = Store::open(paths)?;
    let record = match (&a.name, a.pid) {
        (_, Some(pid)) => store.find_by_pid(pid)?,
        (Some(name), None) => store.find_by_name(name)?,
        (None, None) => unreachable!("clap requires a name or --pid"),
    };
    let report = crate::vm::stop::stop_vm(&store, &record, Duration::from_secs(a.timeout)).await?;
    for f in &report.teardown.failures {
        eprintln!("warning: {f}; the next fcvm command retries it");
    }
    eprintln!("{}", stop_message(&record, &report));
    Ok(ExitCode::SUCCESS)
}

/// What `fcvm stop` says about `record` after `report`.
pub fn stop_message(record: &crate::state::VmRecord, report: &crate::vm::StopReport) -> String {
    use crate::state::{VmKind, VmStatus};
    if record.kind == VmKind::PageServer {
        return if report.draining {
            format!(
                "page server {} stopped accepting clones and exits when its live clones stop \
                 (stop them first; killing it makes them fail)",
                record.name
            )
        } else {
            format!("stopped page server {}", record.name)
        };
    }
    if record.status == VmStatus::Failed {
        return format!("removed failed VM {}", record.name);
    }
    let how = if report.graceful {
        "guest shut down"
    } else {
        "forced"
    };
    format!("stopped {} ({how})", record.name)
}

fn cmd_ls(paths: &Paths, a: args::LsArgs) -> Result<ExitCode> {
    let records = if paths.state_dir().exists() {
        Store::open(paths)?.list()?
    } else {
        vec![]
    };
    let entries = ls::entries(records, a.pid);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        print!("{}", ls::table(&entries));
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code for a command line clap rejected: 0 for `--help`/`--version`; 125 for the
/// commands that forward a container's exit code (`podman run`, `exec`), so a usage error
/// never looks like the container's; clap's 2 otherwise.
pub fn usage_exit_code(e: &clap::Error, argv: &[std::ffi::OsString]) -> u8 {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            2
        } else {
            0
        };
    }
    let forwards = argv
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        .is_some_and(|a| a == "podman" || a == "exec");
    if forwards {
        crate::commands::podman::EXIT_FCVM_FAILED
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Name;
    use crate::state::{VmKind, VmRecord, VmStatus};
    use crate::vm::StopReport;
    use clap::Parser;

    fn record(kind: VmKind, status: VmStatus) -> VmRecord {
        let mut r = VmRecord::new("id".into(), Name::parse("x").unwrap(), kind, "/r".into());
        r.status = status;
        r
    }

    fn report(graceful: bool, draining: bool) -> StopReport {
        StopReport {
            graceful,
            exit: None,
            teardown: Default::default(),
            draining,
        }
    }

    #[test]
    fn stop_messages_say_what_was_stopped() {
        let server = record(VmKind::PageServer, VmStatus::Running);
        assert_eq!(
            stop_message(&server, &report(true, false)),
            "stopped page server x"
        );
        assert!(stop_message(&server, &report(true, true)).contains("stopped accepting clones"));
        let vm = record(VmKind::Raw, VmStatus::Running);
        assert_eq!(
            stop_message(&vm, &report(true, false)),
            "stopped x (guest shut down)"
        );
        assert_eq!(
            stop_message(&vm, &report(false, false)),
            "stopped x (forced)"
        );
        let failed = record(VmKind::Clone, VmStatus::Failed);
        assert_eq!(
            stop_message(&failed, &report(false, false)),
            "removed failed VM x"
        );
    }

    #[test]
    fn usage_errors_of_forwarding_commands_exit_125() {
        let code = |args: &[&str]| {
            let argv: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
            let err = Cli::try_parse_from(&argv).unwrap_err();
            usage_exit_code(&err, &argv)
        };
        assert_eq!(code(&["fcvm", "podman", "run", "--nope", "img"]), 125);
        assert_eq!(code(&["fcvm", "--verbose", "exec", "--nope"]), 125);
        assert_eq!(code(&["fcvm", "ls", "--nope"]), 2);
        assert_eq!(code(&["fcvm", "podman", "run", "--help"]), 0);
        assert_eq!(code(&["fcvm", "--version"]), 0);
    }

    #[test]
    fn completion_scripts_name_the_subcommands_and_run_flags() {
        for shell in [
            args::CompletionShell::Bash,
            args::CompletionShell::Zsh,
            args::CompletionShell::Fish,
        ] {
            let text = String::from_utf8(completion_script(shell)).unwrap();
            for word in [
                "podman",
                "exec",
                "snapshot",
                "env-file",
                "privileged",
                "completions",
            ] {
                assert!(text.contains(word), "{shell:?} lacks {word}");
            }
            assert!(!text.contains("__resume-guard"), "{shell:?}");
        }
    }

    #[test]
    fn man_pages_for_fcvm_and_its_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_man_pages(dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for page in [
            "fcvm.1",
            "fcvm-podman-run.1",
            "fcvm-exec.1",
            "fcvm-snapshot-create.1",
        ] {
            assert!(names.contains(&page.to_string()), "{page} not in {names:?}");
        }
        let run = std::fs::read_to_string(dir.path().join("fcvm-podman-run.1")).unwrap();
        assert!(
            run.starts_with(".ie") || run.contains(".TH"),
            "roff: {run:.200}"
        );
        assert!(
            run.contains("env\\-file") || run.contains("env-file"),
            "{run:.2000}"
        );
    }
}
