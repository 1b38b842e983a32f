//! The wire protocol between the fcvm host and `fc-agent`, the guest agent.
//!
//! Everything both sides must agree on lives here, so a change shows up as a compile error on
//! both ends rather than as a hang at run time:
//!
//! - [`vsock`]: ports, CIDs and Firecracker's hybrid-vsock `CONNECT`/`OK` handshake.
//! - [`boot`]: kernel command-line keys the agent reads (`root=`, `ip=`, `fcvm.debug=`).
//! - [`cmdline`]: building that command line on the host, and the guest device paths.
//! - [`plan`]: the run plan the host puts in MMDS and the agent executes.
//! - [`status`]: typed, versioned messages on the status port (Ready, Exit, Error, ImageReady, Proceed, Health).
//! - [`health`]: the container health check (`--health-check`), its states and their state machine.
//! - [`frame`]: the versioned binary framing used for container output, stdin/TTY and exec.
//! - [`exec`]: the exec request carried in the first frame of an exec connection.
//! - [`initrd`]: the newc cpio format of the agent initrd (written by the host, unpacked by the guest kernel).
//!
//! # Session overview
//!
//! ```text
//!  host (fcvm)                                         guest (fc-agent, PID 1)
//!  listen <uds>_4999, <uds>_4997 (+ <uds>_4996 if -i/-t)
//!  PUT /mmds {"latest":{"container-plan":{..}}}
//!  InstanceStart ------------------------------------> boot, mounts, cgroups, network
//!                                                      GET MMDS plan, load/pull image
//!             <-------- ImageReady{digest} (4999) ---- only when plan.await_proceed: waits
//!             --------> Proceed{plan} (4999) --------- (the host snapshots before; a restored
//!                                                      VM reconnects, says ImageReady again)
//!  <uds>_4997 <-------- connect (output frames) ------
//!  <uds>_4996 <-------- connect (input frames)  ------ only when plan.interactive || plan.tty
//!  <uds>_4999 <-------- Ready ------------------------ container started, exec server up
//!             <-------- Health{state} (4999) --------- with plan.health_check: each change
//!             <-------- Stdout/Stderr frames (4997)
//!             --------> Stdin/Eof/Resize/Signal (4996)
//!             <-------- output connection closed ----- all output flushed
//!             <-------- Exit{code} (4999) ------------
//!                                                      poweroff: the VMM process exits
//! ```

#![deny(missing_docs)]

pub mod boot;
pub mod cmdline;
pub mod exec;
pub mod frame;
pub mod health;
pub mod initrd;
pub mod plan;
pub mod status;
pub mod vsock;
