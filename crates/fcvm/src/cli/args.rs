//! Command-line grammar (clap). Parsing only: validation and work happen in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run OCI containers and raw kernels in Firecracker microVMs, with snapshots and clones.
#[derive(Debug, Parser)]
#[command(name = "fcvm", version, about, propagate_version = true)]
pub struct Cli {
    /// Base directory for everything fcvm stores (default: /var/lib/fcvm as root).
    #[arg(long, global = true, env = "FCVM_BASE_DIR", value_name = "DIR")]
    pub base_dir: Option<PathBuf>,

    /// Run Firecracker without its jailer even as root (warns; FCVM_NO_JAILER=1 too).
    #[arg(long, global = true)]
    pub no_jailer: bool,

    /// More logging (repeat for more); FCVM_LOG=debug works too. No short form: `-v` is
    /// `podman run`'s --volume, as in podman.
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prepare this host: Firecracker, probe kernel (and more as they exist).
    Setup(SetupArgs),
    /// Check this host and report what works, with fixes.
    Doctor(DoctorArgs),
    /// Boot a raw kernel in a microVM (like firectl).
    Run(RunArgs),
    /// Stop a VM started by fcvm.
    Stop(StopArgs),
    /// List VMs.
    Ls(LsArgs),
    /// Containers in microVMs (`fcvm podman run`).
    #[command(subcommand)]
    Podman(super::podman::PodmanCommand),
    /// Run a command in a container VM (or in the VM itself with --vm).
    Exec(super::podman::ExecArgs),
    /// Create, serve and clone snapshots.
    #[command(
        subcommand,
        after_help = "List and remove snapshots with `fcvm snapshots [ls|rm|prune]`."
    )]
    Snapshot(super::snapshot::SnapshotCommand),
    /// List and remove snapshots.
    Snapshots(super::snapshot::SnapshotsArgs),
    /// List container VMs as `podman ps` does (`fcvm ls` lists every VM).
    Ps(PsArgs),
    /// Print one VM's record as JSON (an array of one, as `podman inspect`).
    Inspect(InspectArgs),
    /// Remove container VMs that ended (exited and failed ones are kept until then); -f
    /// stops running ones.
    Rm(RmArgs),
    /// Print a container VM's output (stdout and stderr apart), running or ended.
    Logs(LogsArgs),
    /// Wait for a container VM's container to end and print its exit code.
    Wait(WaitArgs),
    /// Send a signal to a container VM's container (default KILL, as podman).
    Kill(KillArgs),
    /// Attach this terminal to a detached (`-d -i`/`-t`) container; Ctrl-P Ctrl-Q detaches.
    Attach(AttachArgs),
    /// Print a shell completion script (`source <(fcvm completions bash)`).
    Completions(CompletionsArgs),
    /// Write man pages (fcvm.1 and one per subcommand) into a directory.
    Man(ManArgs),
}

/// `fcvm ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Also the ended ones (failed, exited).
    #[arg(short, long)]
    pub all: bool,
    /// `table` (default) or `json`.
    #[arg(long, value_enum, default_value_t = PsFormat::Table)]
    pub format: PsFormat,
}

/// `fcvm ps --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PsFormat {
    /// Aligned columns.
    Table,
    /// A JSON array (podman's key names: Id, Names, Image, State, Status, ExitCode, Created).
    Json,
}

/// `fcvm inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// VM names.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `fcvm rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop running ones first.
    #[arg(short, long)]
    pub force: bool,
    /// With -f: seconds the guest gets to shut down before the VM is killed.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub time: u64,
    /// Container VM names.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `fcvm logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Lead each line with its time (RFC 3339, nanoseconds).
    #[arg(short, long)]
    pub timestamps: bool,
    /// Container VM name.
    pub name: String,
}

/// `fcvm wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Container VM names (their codes are printed in order, one per line).
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `fcvm kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal: a name (TERM, SIGUSR1) or a number.
    #[arg(short, long, default_value = "KILL")]
    pub signal: String,
    /// Container VM names.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `fcvm attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Keys that detach and leave the container running: a comma list of single
    /// characters and ctrl-<key> (docker's syntax); empty for none.
    #[arg(long, value_name = "KEYS", default_value = crate::commands::attach::DEFAULT_DETACH_KEYS)]
    pub detach_keys: String,
    /// Container VM name.
    pub name: String,
}

/// `fcvm completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Which shell.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells with completion scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    /// bash (`source <(fcvm completions bash)`, or into /etc/bash_completion.d/fcvm).
    Bash,
    /// zsh (into a directory of $fpath as `_fcvm`).
    Zsh,
    /// fish (into ~/.config/fish/completions/fcvm.fish).
    Fish,
}

/// `fcvm man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write the pages to (created if missing), e.g. /usr/local/share/man/man1.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// `fcvm setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Which step; all of them when omitted.
    #[command(subcommand)]
    pub step: Option<SetupStep>,
}

/// Setup steps.
#[derive(Debug, Clone, Subcommand)]
pub enum SetupStep {
    /// Install Firecracker and the jailer (pinned release, checksums verified).
    Firecracker,
    /// Write the built-in probe guest kernel.
    Probe,
    /// Pack the static fc-agent binary into the agent initrd.
    Agent,
    /// Build the guest root filesystem (Debian + podman; needs root and mmdebstrap).
    Rootfs,
    /// Build the guest kernel from Debian's linux-source (slow; for hosts with real KVM).
    Kernel,
    /// Make the base dir reflink-capable (loop-file btrfs when it is not); explicit only.
    Storage {
        /// Size of the loop filesystem.
        #[arg(long, default_value = crate::setup::storage::DEFAULT_SIZE)]
        size: String,
    },
    /// Start KSM (ksmd) so clones share identical memory pages; explicit only.
    Ksm,
}

/// `fcvm doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `fcvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM name (letters, digits, '-', '_', '.'); unique among running VMs.
    #[arg(long)]
    pub name: String,
    /// Uncompressed ELF kernel, or `probe` for the built-in probe guest.
    #[arg(long)]
    pub kernel: String,
    /// Initrd image.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Root filesystem image, attached read-write as /dev/vda.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Kernel command line (default: console=ttyS0 reboot=k panic=1 pci=off).
    #[arg(long)]
    pub boot_args: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpu: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u64,
    /// Track dirty pages so diff snapshots are possible.
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Return once the VM has booted and leave it running.
    #[arg(short, long)]
    pub detach: bool,
    /// Network: `none`, `tap` (eth0 on a TAP named tap0 in the VM's own network
    /// namespace; snapshot clones get the same in theirs), or `bridged` (root: as `podman
    /// run --network bridged`; the guest's address goes on the kernel command line as
    /// `ip=`, which a kernel with CONFIG_IP_PNP applies).
    #[arg(long, value_enum, default_value_t = NetworkMode::None)]
    pub network: NetworkMode,
    /// Publish a guest port: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]; repeat it, or join
    /// with commas. Needs --network bridged.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
    /// Let KSM merge the VM's identical pages with other VMs' (auto: when ksmd runs).
    #[arg(long, value_enum, default_value_t = super::snapshot::KsmMode::Auto)]
    pub ksm: super::snapshot::KsmMode,
}

/// `fcvm run --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkMode {
    /// No network device.
    None,
    /// A TAP in the VM's own network namespace.
    Tap,
    /// A TAP in the VM's own namespace, a veth pair to the host, NAT, published ports.
    Bridged,
}

/// `fcvm stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// VM name.
    #[arg(required_unless_present = "pid")]
    pub name: Option<String>,
    /// Select the VM by pid (fcvm's or Firecracker's) instead of name.
    #[arg(long, conflicts_with = "name")]
    pub pid: Option<u32>,
    /// Seconds to wait for a graceful guest shutdown before forcing.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

/// `fcvm ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON (an array of records).
    #[arg(long)]
    pub json: bool,
    /// Only the VM with this pid (fcvm's or Firecracker's).
    #[arg(long)]
    pub pid: Option<u32>,
}
