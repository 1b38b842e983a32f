//! Ending the VM.

use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Stops every other process, flushes the root filesystem and resets the machine.
///
/// Firecracker is started with `reboot=k`, so a reset makes the VMM process exit, which is how a
/// microVM "powers off".
pub fn power_off() -> ! {
    crate::info!("powering off");
    // kill(-1) from PID 1 reaches everything but PID 1 itself.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(5));
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    let err = reboot(RebootMode::RB_AUTOBOOT).err();
    // Only reached if reboot failed (no CAP_SYS_BOOT); exiting PID 1 panics a real kernel, which
    // with `panic=1` also ends the VM.
    crate::info!("reboot failed: {err:?}; exiting");
    std::process::exit(1)
}
