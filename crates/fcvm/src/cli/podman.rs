//! `fcvm podman run` and `fcvm exec`: containers in microVMs.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::commands::exec::{self, ExecOptions, Target};
use crate::commands::podman::{self, PodmanRunRequest};
use crate::paths::Paths;

/// `fcvm podman ...`.
#[derive(Debug, Subcommand)]
pub enum PodmanCommand {
    /// Run a container in a new microVM, in the foreground; exits with the container's code.
    Run(Box<PodmanRunArgs>),
}

/// `fcvm podman run`.
#[derive(Debug, Args)]
#[command(
    override_usage = "fcvm podman run [OPTIONS] IMAGE [CMD [ARG...]]",
    after_help = RUN_AFTER_HELP
)]
pub struct PodmanRunArgs {
    /// VM name (letters, digits, '-', '_', '.'); unique among running VMs. Generated
    /// (adjective_noun_xxxx) when omitted.
    #[arg(long)]
    pub name: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpu: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    /// Environment variable for the container: NAME=VALUE, or NAME alone for this host's
    /// value (skipped when unset here), or NAME* for every host variable starting with NAME.
    /// Repeat it; A=1,B=2 is split only when every piece is NAME=VALUE without another '='.
    #[arg(short, long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// Read environment variables from FILE (one NAME=VALUE or NAME per line; '#' comment
    /// lines and blank lines skipped; the value is taken verbatim, quotes included). -e wins.
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Keep standard input open and forward it to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal (window size forwarded; with -i the local terminal
    /// goes raw, without -i Ctrl-C is forwarded to the container as SIGINT).
    #[arg(short, long)]
    pub tty: bool,
    /// User (name or uid, with an optional :group) the command runs as in the container.
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Working directory of the command in the container (absolute).
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Override the image's entrypoint (a command, or a JSON array as podman takes it).
    #[arg(long, value_name = "COMMAND")]
    pub entrypoint: Option<String>,
    /// Run an init process (catatonit) as the container's PID 1 that reaps zombies and
    /// forwards signals.
    #[arg(long)]
    pub init: bool,
    /// Label KEY=VALUE on the container (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// Give the container every capability and the VM's devices (mknod works, /dev/vd*
    /// visible). The VM is still the isolation boundary.
    #[arg(long)]
    pub privileged: bool,
    /// Command as one string, split like a shell would (no expansion); instead of CMD...
    #[arg(long, value_name = "COMMAND")]
    pub cmd: Option<String>,
    /// Seconds the container gets to exit after Ctrl-C, SIGTERM or SIGHUP asked it to stop,
    /// before it is killed (as podman's --stop-timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub stop_timeout: u64,
    /// OCI or docker archive (`podman save`) to run; attached read-only to the VM.
    #[arg(long, value_name = "FILE")]
    pub image_archive: Option<PathBuf>,
    /// Verify the registry's TLS certificate when the guest pulls IMAGE (podman's flag;
    /// default true). `--tls-verify=false` (or `--tls-verify false`) for a registry that
    /// serves plain HTTP or a certificate the guest does not trust.
    #[arg(
        long,
        value_name = "true|false",
        num_args = 0..=1,
        default_missing_value = "",
        value_parser = parse_tls_verify
    )]
    pub tls_verify: Option<TlsVerifyArg>,
    /// Guest kernel: a path, or `probe` (default: the one from `fcvm setup kernel`).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest root filesystem image (default: `fcvm setup rootfs`'s; env FCVM_ROOTFS).
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Network: `none` (only the agent's metadata link), `bridged` (root: a veth pair to
    /// the host, NAT, published ports); `rootless` is not built yet.
    #[arg(long, value_enum, default_value_t = PodmanNetwork::None)]
    pub network: PodmanNetwork,
    /// Publish a container port: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]; repeat it, or
    /// join with commas (8080:80,8443:443). Needs --network bridged.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
    /// Share a host directory with the container: HOST_DIR:GUEST_PATH[:ro] (absolute paths;
    /// `:ro` refuses every write, on the host too). Repeat it, or join with commas
    /// (/tmp/logs:/logs,/tmp/data:/data:ro). Served over FUSE on the VM's vsock; writeback
    /// caching unless FCVM_NO_WRITEBACK_CACHE=1.
    #[arg(long = "map", value_name = "HOST_DIR:GUEST_PATH[:ro]")]
    pub map: Vec<String>,
    /// The same as --map, spelled as podman's (`-v` is not --verbose here).
    #[arg(short = 'v', long = "volume", value_name = "HOST_DIR:GUEST_PATH[:ro]")]
    pub volume: Vec<String>,
    /// Boot cold: neither restore nor create an image cache entry (env FCVM_NO_SNAPSHOT=1).
    #[arg(long)]
    pub no_snapshot: bool,
    /// Check the container's health with an HTTP GET of URL from inside the VM (whose
    /// network the container shares), e.g. http://127.0.0.1:80/: 2xx/3xx is healthy. It
    /// drives `fcvm ls`'s HEALTH column; with the image cache, the first pass snapshots the
    /// warm application (the startup tier), which later runs with the same settings restore.
    #[arg(long, value_name = "URL")]
    pub health_check: Option<String>,
    /// Time between health checks (e.g. 500ms, 2s, 1m; a bare number is seconds).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "2s",
        requires = "health_check"
    )]
    pub health_interval: String,
    /// Time one health check may take.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "2s",
        requires = "health_check"
    )]
    pub health_timeout: String,
    /// Failed health checks in a row that make the container unhealthy.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "health_check")]
    pub health_retries: u32,
    /// Run in the background: print the VM's name once the container has started and
    /// return. A supervisor process keeps the VM, its exit code and its output
    /// (`fcvm logs NAME`); it survives the terminal. Stop it with `fcvm stop NAME`.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the VM's record and logs when the container exits (without it an exited VM
    /// stays listed by `fcvm ps -a`, with its exit code and logs, until `fcvm rm`).
    #[arg(long)]
    pub rm: bool,
    /// Run the missing `fcvm setup` steps first (Firecracker, agent, rootfs, kernel), with
    /// their progress; the ones already done are only checked.
    #[arg(long)]
    pub setup: bool,
    /// Container log option, as podman's: max-size=SIZE bounds each of the log's two files
    /// (default 4mb, so at most 8mb per VM).
    #[arg(long, value_name = "max-size=SIZE")]
    pub log_opt: Vec<String>,
    /// IMAGE, then the command and its arguments. IMAGE: a registry reference,
    /// `localhost/NAME:TAG` from this host's podman storage, or with --image-archive the
    /// reference to run from the archive. Everything after IMAGE is the command, its own
    /// flags included (`alpine ls -la`).
    #[arg(
        value_name = "IMAGE [CMD [ARG...]]",
        trailing_var_arg = true,
        num_args = 1..,
        required_unless_present_any = ["image_archive", "tls_verify"]
    )]
    pub image_and_command: Vec<String>,
}

/// How `podman run`'s positional arguments are read, under `--help`.
const RUN_AFTER_HELP: &str = "\
Everything after IMAGE is the container's command, as with podman: `fcvm podman run alpine ls -la`.
A `--` right after IMAGE is dropped (`IMAGE -- CMD` works as before); anywhere later it is part
of the command. Options of fcvm go before IMAGE.";

impl PodmanRunArgs {
    /// IMAGE and the command after it (a `--` right after IMAGE is dropped).
    pub fn image_and_command(&self) -> (Option<String>, Vec<String>) {
        split_leading(&self.tls_verify_and_words().1)
    }

    /// `--tls-verify`: None when not given.
    pub fn tls_verify(&self) -> Option<bool> {
        self.tls_verify_and_words().0
    }

    /// `--tls-verify` and the positional words. The flag takes the next word when it is
    /// `true` or `false` (`--tls-verify false`, as well as `--tls-verify=false`); any other
    /// word it took is IMAGE, after a bare `--tls-verify` (`--tls-verify IMAGE`).
    fn tls_verify_and_words(&self) -> (Option<bool>, Vec<String>) {
        let words = self.image_and_command.clone();
        match &self.tls_verify {
            None => (None, words),
            Some(TlsVerifyArg::Bare) => (Some(true), words),
            Some(TlsVerifyArg::Value(v)) => (Some(*v), words),
            Some(TlsVerifyArg::Word(image)) => {
                let mut all = vec![image.clone()];
                all.extend(words);
                (Some(true), all)
            }
        }
    }

    /// `--tls-verify=WORD` with a WORD that is no boolean (`args`: this process's
    /// arguments): refused, where `--tls-verify WORD` makes WORD the image.
    pub fn check_tls_verify_value(&self, args: &[String]) -> Result<(), String> {
        match &self.tls_verify {
            Some(TlsVerifyArg::Word(w))
                if args.iter().any(|a| *a == format!("--tls-verify={w}")) =>
            {
                Err(format!(
                    "invalid value {w:?} for --tls-verify: expected true or false"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// `--tls-verify` as clap read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsVerifyArg {
    /// `--tls-verify` alone (before another option, or last).
    Bare,
    /// `--tls-verify=BOOL` or `--tls-verify BOOL`.
    Value(bool),
    /// A word after `--tls-verify` that is no boolean: IMAGE.
    Word(String),
}

/// `--tls-verify`'s value: the spellings of a boolean podman (Go's `ParseBool`) accepts.
fn parse_tls_verify(s: &str) -> Result<TlsVerifyArg, String> {
    Ok(match s {
        "" => TlsVerifyArg::Bare,
        "1" | "t" | "T" | "true" | "TRUE" | "True" => TlsVerifyArg::Value(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => TlsVerifyArg::Value(false),
        other => TlsVerifyArg::Word(other.to_owned()),
    })
}

/// The first word, and the rest without a `--` that directly follows the first word.
fn split_leading(words: &[String]) -> (Option<String>, Vec<String>) {
    match words.split_first() {
        None => (None, Vec::new()),
        Some((first, rest)) => {
            let rest = match rest.split_first() {
                Some((dash, after)) if dash == "--" => after,
                _ => rest,
            };
            (Some(first.clone()), rest.to_vec())
        }
    }
}

/// `fcvm podman run --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PodmanNetwork {
    /// No network beyond the agent's metadata link.
    None,
    /// Per-VM namespace, veth pair, NAT (root).
    Bridged,
    /// User-mode networking without root (not built yet).
    Rootless,
}

/// `fcvm exec`.
#[derive(Debug, Args)]
#[command(
    override_usage = "fcvm exec [OPTIONS] NAME CMD [ARG...]\n       fcvm exec [OPTIONS] --name NAME|--pid PID CMD [ARG...]",
    after_help = EXEC_AFTER_HELP
)]
pub struct ExecArgs {
    /// VM name (instead of NAME before the command).
    #[arg(long, conflicts_with = "pid")]
    pub name: Option<String>,
    /// Select the VM by the pid of its fcvm (or VMM) process.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Run in the VM itself instead of the container.
    #[arg(long)]
    pub vm: bool,
    /// Forward standard input.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal (raw mode here, window size forwarded).
    #[arg(short, long)]
    pub tty: bool,
    /// Extra environment variable NAME=VALUE, or NAME for this host's value (as `podman run -e`).
    #[arg(short, long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// Working directory of the command (absolute).
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// NAME (unless --name or --pid is given), then the command and its arguments.
    #[arg(
        value_name = "[NAME] CMD [ARG...]",
        trailing_var_arg = true,
        num_args = 1..,
        required = true
    )]
    pub name_and_command: Vec<String>,
}

/// How `exec`'s positional arguments are read, under `--help`.
const EXEC_AFTER_HELP: &str = "\
`fcvm exec web ls -la` and `fcvm exec --name web -- ls -la` are the same. Everything after NAME
is the command, its own flags included.";

impl ExecArgs {
    /// The VM and the command.
    pub fn target_and_command(&self) -> (Target, Vec<String>) {
        if let Some(pid) = self.pid {
            return (Target::Pid(pid), self.name_and_command.clone());
        }
        if let Some(name) = &self.name {
            return (Target::Name(name.clone()), self.name_and_command.clone());
        }
        let (name, command) = split_leading(&self.name_and_command);
        (Target::Name(name.unwrap_or_default()), command)
    }
}

/// Dispatch `fcvm podman`.
pub async fn podman(paths: &Paths, cmd: PodmanCommand) -> Result<ExitCode> {
    match cmd {
        PodmanCommand::Run(a) => run(paths, *a).await,
    }
}

async fn run(paths: &Paths, a: PodmanRunArgs) -> Result<ExitCode> {
    let supervisor = std::env::var_os(podman::detach::NOTIFY_FD_ENV).is_some();
    // In the foreground, or in a detached run's supervisor (which still reports to the
    // user's terminal until the container has started).
    if a.setup && (supervisor || !a.detach) {
        if let Err(e) = super::cmd_setup(paths, None) {
            eprintln!("fcvm: error: --setup: {e:#}");
            return Ok(ExitCode::from(podman::EXIT_FCVM_FAILED));
        }
    }
    if a.detach && !supervisor {
        // Every check and the boot happen in the supervisor, which reports on our stderr
        // until the container has started.
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return Ok(match podman::detach::spawn_supervisor(&args) {
            Ok(podman::detach::Started::Ready(name)) => {
                println!("{name}");
                ExitCode::SUCCESS
            }
            Ok(podman::detach::Started::Failed(code)) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("fcvm: error: {}", crate::report::chain(&e));
                ExitCode::from(podman::EXIT_FCVM_FAILED)
            }
        });
    }
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Err(e) = a.check_tls_verify_value(&argv) {
        eprintln!("fcvm: error: {e}");
        return Ok(ExitCode::from(podman::EXIT_FCVM_FAILED));
    }
    let (image, command) = a.image_and_command();
    let tls_verify = a.tls_verify();
    let req = PodmanRunRequest {
        name: a.name,
        image,
        tls_verify,
        image_archive: a.image_archive,
        command,
        cmd: a.cmd,
        env: a.env,
        env_files: a.env_file,
        vcpus: a.cpu,
        mem_mib: a.mem,
        interactive: a.interactive,
        tty: a.tty,
        user: a.user,
        workdir: a.workdir,
        entrypoint: a.entrypoint,
        init: a.init,
        labels: a.label,
        privileged: a.privileged,
        kernel: a.kernel,
        rootfs: a.rootfs,
        stop_timeout: Duration::from_secs(a.stop_timeout),
        network: match a.network {
            PodmanNetwork::None => podman::NetworkRequest::None,
            PodmanNetwork::Bridged => podman::NetworkRequest::Bridged,
            PodmanNetwork::Rootless => podman::NetworkRequest::Rootless,
        },
        publish: a.publish,
        volumes: a.map.into_iter().chain(a.volume).collect(),
        no_snapshot: a.no_snapshot,
        health: a.health_check.map(|url| podman::health::HealthRequest {
            url,
            interval: a.health_interval,
            timeout: a.health_timeout,
            retries: a.health_retries,
        }),
        remove: a.rm,
        log_opts: a.log_opt,
        detached: a.detach && supervisor,
    };
    let outcome = match podman::run(paths, &req).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fcvm: error: {}", crate::report::chain(&e));
            return Ok(ExitCode::from(e.exit_code()));
        }
    };
    std::io::stdout().flush()?;
    if let Some(err) = &outcome.guest_error {
        eprintln!("fcvm: error: the container could not run: {err}");
        // The default network carries nothing but the agent's metadata link.
        if req.network == podman::NetworkRequest::None && err.starts_with("podman pull") {
            eprintln!("fcvm: hint: with --network none the guest cannot reach a registry; pull with --network bridged");
        }
    }
    if outcome.interrupted.is_some() {
        eprintln!(
            "fcvm: interrupted; container and VM {} stopped",
            outcome.name
        );
    }
    Ok(ExitCode::from(outcome.exit_code.clamp(0, 255) as u8))
}

/// Dispatch `fcvm exec`.
pub async fn exec(paths: &Paths, a: ExecArgs) -> Result<ExitCode> {
    let (target, command) = a.target_and_command();
    let opts = ExecOptions {
        target,
        in_vm: a.vm,
        interactive: a.interactive,
        tty: a.tty,
        env: a.env,
        workdir: a.workdir,
        command,
    };
    match exec::exec(paths, &opts).await {
        Ok(code) => {
            std::io::stdout().flush()?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Err(e) => {
            eprintln!("fcvm: error: {}", crate::report::chain(&e));
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{Cli, Command};
    use clap::Parser;

    fn run_args(args: &[&str]) -> PodmanRunArgs {
        let argv = ["fcvm", "podman", "run"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Podman(PodmanCommand::Run(a)) => *a,
            other => panic!("{other:?}"),
        }
    }

    fn image_cmd(args: &[&str]) -> (Option<String>, Vec<String>) {
        run_args(args).image_and_command()
    }

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn everything_after_the_image_is_the_command_flags_included() {
        let img = Some("alpine".to_string());
        assert_eq!(
            image_cmd(&["alpine", "ls", "-la"]),
            (img.clone(), words(&["ls", "-la"]))
        );
        // A command that starts with a flag, and one that spells fcvm's own flags.
        assert_eq!(
            image_cmd(&["alpine", "-la"]),
            (img.clone(), words(&["-la"]))
        );
        assert_eq!(
            image_cmd(&["alpine", "sh", "-c", "echo -e x", "--name", "y", "-it"]),
            (
                img.clone(),
                words(&["sh", "-c", "echo -e x", "--name", "y", "-it"])
            )
        );
        assert_eq!(run_args(&["alpine", "--name", "y"]).name, None);
        assert_eq!(image_cmd(&["alpine"]), (img.clone(), vec![]));
    }

    #[test]
    fn a_double_dash_after_the_image_still_works_and_later_ones_are_kept() {
        let img = Some("alpine".to_string());
        assert_eq!(
            image_cmd(&["--name", "x", "alpine", "--", "ls", "-la"]),
            (img.clone(), words(&["ls", "-la"]))
        );
        assert_eq!(
            image_cmd(&["alpine", "sh", "--", "x"]),
            (img.clone(), words(&["sh", "--", "x"]))
        );
        assert_eq!(
            image_cmd(&["--", "alpine", "ls"]),
            (img.clone(), words(&["ls"]))
        );
    }

    #[test]
    fn the_image_is_needed_unless_an_archive_is_given() {
        assert!(Cli::try_parse_from(["fcvm", "podman", "run", "--name", "x"]).is_err());
        assert_eq!(image_cmd(&["--image-archive", "img.tar"]), (None, vec![]));
        // A mistyped option before the image is still a usage error, not an image name.
        assert!(Cli::try_parse_from(["fcvm", "podman", "run", "--nmae", "x", "img"]).is_err());
    }

    #[test]
    fn tls_verify_is_spelled_as_podman_s() {
        let tls = |args: &[&str]| {
            let a = run_args(args);
            (a.tls_verify(), a.image_and_command())
        };
        let img = |cmd: &[&str]| (Some("reg:5000/a:1".to_string()), words(cmd));
        assert_eq!(tls(&["reg:5000/a:1", "echo"]), (None, img(&["echo"])));
        for off in [
            &["--tls-verify=false", "reg:5000/a:1", "echo"][..],
            &["--tls-verify", "false", "reg:5000/a:1", "echo"],
            &[
                "--tls-verify",
                "false",
                "--name",
                "x",
                "reg:5000/a:1",
                "echo",
            ],
            &["--tls-verify=0", "reg:5000/a:1", "echo"],
        ] {
            assert_eq!(tls(off), (Some(false), img(&["echo"])), "{off:?}");
        }
        for on in [
            &["--tls-verify", "reg:5000/a:1", "echo"][..],
            &["--tls-verify", "--name", "x", "reg:5000/a:1", "echo"],
            &["--tls-verify", "true", "reg:5000/a:1", "echo"],
            &["--tls-verify=true", "reg:5000/a:1", "echo"],
        ] {
            assert_eq!(tls(on), (Some(true), img(&["echo"])), "{on:?}");
        }
        assert_eq!(
            tls(&["--tls-verify", "reg:5000/a:1"]),
            (Some(true), img(&[]))
        );
        // After IMAGE it is the command's.
        assert_eq!(
            tls(&["reg:5000/a:1", "--tls-verify", "false"]),
            (None, img(&["--tls-verify", "false"]))
        );
        // `=` with no boolean is a mistake, not an image.
        let argv = ["fcvm", "podman", "run", "--tls-verify=maybe", "img"];
        let a = run_args(&argv[3..]);
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let e = a.check_tls_verify_value(&argv).unwrap_err();
        assert!(e.contains("expected true or false"), "{e}");
        let argv = ["fcvm", "podman", "run", "--tls-verify", "img"];
        let a = run_args(&argv[3..]);
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        a.check_tls_verify_value(&argv).unwrap();
    }

    #[test]
    fn map_and_volume_flags_repeat_and_v_is_not_verbose() {
        let a = run_args(&[
            "-v",
            "/a:/a",
            "--map",
            "/b:/b:ro,/c:/c",
            "--volume=/d:/d",
            "--map=/e:/e",
            "img",
            "-v",
        ]);
        assert_eq!(a.map, words(&["/b:/b:ro,/c:/c", "/e:/e"]));
        assert_eq!(a.volume, words(&["/a:/a", "/d:/d"]));
        assert_eq!(a.image_and_command(), (Some("img".into()), words(&["-v"])));
        let cli = Cli::try_parse_from(["fcvm", "--verbose", "podman", "run", "img"]).unwrap();
        assert_eq!(cli.verbose, 1);
        assert!(Cli::try_parse_from(["fcvm", "-v", "ls"]).is_err());
    }

    #[test]
    fn run_flags_parse_as_podman_spells_them() {
        let a = run_args(&[
            "-e",
            "A=1",
            "-e",
            "HOME",
            "--env-file",
            "a.env",
            "--env-file=b.env",
            "-u",
            "1000:1000",
            "-w",
            "/tmp",
            "--entrypoint",
            "/bin/sh",
            "--init",
            "-l",
            "k=v",
            "--label",
            "x=y",
            "--privileged",
            "-it",
            "img",
            "-c",
            "id",
        ]);
        assert_eq!(a.env, words(&["A=1", "HOME"]));
        assert_eq!(
            a.env_file,
            vec![PathBuf::from("a.env"), PathBuf::from("b.env")]
        );
        assert_eq!(a.user.as_deref(), Some("1000:1000"));
        assert_eq!(a.workdir.as_deref(), Some("/tmp"));
        assert_eq!(a.entrypoint.as_deref(), Some("/bin/sh"));
        assert!(a.init && a.privileged && a.interactive && a.tty);
        assert_eq!(a.label, words(&["k=v", "x=y"]));
        assert_eq!(
            a.image_and_command(),
            (Some("img".into()), words(&["-c", "id"]))
        );
        let a = run_args(&["--workdir=/w", "--user=nobody", "img"]);
        assert_eq!(
            (a.workdir.as_deref(), a.user.as_deref()),
            (Some("/w"), Some("nobody"))
        );
    }

    fn exec_target(args: &[&str]) -> (String, Vec<String>) {
        let argv = ["fcvm", "exec"].iter().chain(args);
        let a = match Cli::try_parse_from(argv).unwrap().command {
            Command::Exec(a) => a,
            other => panic!("{other:?}"),
        };
        match a.target_and_command() {
            (Target::Name(n), c) => (n, c),
            (Target::Pid(p), c) => (format!("pid:{p}"), c),
        }
    }

    #[test]
    fn exec_takes_the_name_first_or_from_name_or_pid() {
        let ls = words(&["ls", "-la"]);
        assert_eq!(
            exec_target(&["web", "ls", "-la"]),
            ("web".into(), ls.clone())
        );
        assert_eq!(
            exec_target(&["-it", "web", "--", "ls", "-la"]),
            ("web".into(), ls.clone())
        );
        assert_eq!(
            exec_target(&["--name", "web", "--", "ls", "-la"]),
            ("web".into(), ls.clone())
        );
        assert_eq!(
            exec_target(&["--name", "web", "ls", "-la"]),
            ("web".into(), ls.clone())
        );
        assert_eq!(
            exec_target(&["--pid", "42", "ls", "-la"]),
            ("pid:42".into(), ls.clone())
        );
        assert_eq!(
            exec_target(&["-w", "/tmp", "web", "pwd"]),
            ("web".into(), words(&["pwd"]))
        );
        assert!(Cli::try_parse_from(["fcvm", "exec"]).is_err());
        assert!(Cli::try_parse_from(["fcvm", "exec", "--name", "a", "--pid", "1", "ls"]).is_err());
    }
}
