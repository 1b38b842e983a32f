//! fc-agent: the guest's PID 1 in an fcvm microVM.
//!
//! Boots from the initrd (see [`init`]), switches into the root drive, fetches the run plan from
//! MMDS, runs the container with podman and relays its I/O over vsock, serves exec requests, and
//! powers the VM off when the container ends. See `README.md` in this crate.

mod agent;
mod channels;
mod container;
mod exec;
mod health;
mod init;
mod log;
mod mmds;
mod net;
mod power;
mod process;
mod reaper;
mod resync;
mod volume;
mod vsock;

fn main() {
    // Answered before anything else, outside a VM too: `fcvm --version` asks it.
    if std::env::args_os().nth(1).is_some_and(|a| a == "--version") {
        println!("fc-agent {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    log::init();
    if std::process::id() != 1 {
        eprintln!("fc-agent: must run as PID 1 of a microVM (it mounts filesystems and powers off); refusing");
        std::process::exit(2);
    }
    if let Err(e) = agent::run() {
        info!("fatal: {e:#}");
    }
    power::power_off();
}
