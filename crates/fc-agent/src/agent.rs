//! The agent's main flow, from PID 1 start to the container's exit code.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fcvm_proto::boot::Cmdline;
use fcvm_proto::frame::read_frame;
use fcvm_proto::plan::Plan;
use fcvm_proto::status::{read_status, Status};
use nix::sys::signal::{SigSet, Signal};

use crate::channels::{Channels, OutputRenewer};
use crate::process::{FrameSink, Running, StdioMode};
use crate::vsock::Vsock;
use crate::{container, exec, health, init, mmds, net, power, reaper, resync};

/// Exit code reported when the agent itself fails (podman uses the same for its own errors).
const AGENT_FAILURE: i32 = 125;
/// How long to wait for the host's listeners.
const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the plan.
const PLAN_TIMEOUT: Duration = Duration::from_secs(30);

/// The status channel, as the agent's threads use it.
#[derive(Clone)]
pub(crate) struct StatusSink(Arc<Channels>);

impl StatusSink {
    pub(crate) fn send(&self, s: &Status) {
        self.0.send_status(s);
    }

    fn fail(&self, e: &anyhow::Error) {
        crate::info!("error: {e:#}");
        self.send(&Status::Error(format!("{e:#}")));
        self.send(&Status::Exit(AGENT_FAILURE));
    }
}

fn read_cmdline() -> anyhow::Result<Cmdline> {
    let text = std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?;
    Ok(Cmdline::parse(&text))
}

/// Runs the whole boot; returns when the VM should power off.
pub fn run() -> anyhow::Result<()> {
    // Before any thread exists, so every thread inherits the mask and the signals can only be
    // taken by `signal_loop` (`reaper::spawn` clears the mask again in children).
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block().context("cannot block signals")?;
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    std::env::set_var("HOME", "/root");

    init::mount_proc()?;
    let cmdline = read_cmdline()?;
    crate::log::set_debug(cmdline.debug());
    let vsock = Vsock::new();
    init::mount_kernel_fs()?;
    init::switch_root(&cmdline)?;
    init::mount_runtime_fs()?;
    init::mount_cgroups()?;
    // Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) now arrives as SIGINT instead of a reset.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    reaper::start();
    crate::info!("root mounted ({})", cmdline.root());

    let status = StatusSink(Arc::new(Channels::new(vsock)));
    status.0.connect_status(HOST_CONNECT_TIMEOUT);
    let state = Arc::new(SignalState::default());
    {
        let (state, status) = (state.clone(), status.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || signal_loop(sigs, state, status))
            .context("cannot start the signal thread")?;
    }
    if let Err(e) = run_container(&cmdline, vsock, &status, &state) {
        status.fail(&e);
    }
    Ok(())
}

fn setup_guest(cmdline: &Cmdline, vsock: Vsock) -> anyhow::Result<Plan> {
    std::fs::create_dir_all("/run/fcvm")?;
    std::fs::write(container::CONTAINERS_CONF_PATH, container::CONTAINERS_CONF)?;
    std::env::set_var("CONTAINERS_CONF", container::CONTAINERS_CONF_PATH);
    net::configure(cmdline.ip()?.as_ref())?;
    let plan = mmds::fetch(PLAN_TIMEOUT)?;
    crate::info!("plan fetched");
    resync::after_boot(&plan);
    // The plan (environment included) is the agent's alone: the container shares this
    // network namespace, so MMDS is closed to everything here before the container exists.
    // The host also empties MMDS once the agent reports, against a container that goes round
    // the route with a raw socket.
    net::close_mmds()?;
    net::set_hostname(plan.hostname.as_deref().unwrap_or("fcvm"))?;
    exec::serve(vsock)?;
    Ok(plan)
}

fn run_container(
    cmdline: &Cmdline,
    vsock: Vsock,
    status: &StatusSink,
    state: &Arc<SignalState>,
) -> anyhow::Result<()> {
    let plan = setup_guest(cmdline, vsock)?;
    // Each line podman's pull reports goes to the host as it comes (shown on its terminal).
    let image = container::prepare_image(&plan, &mut |line| {
        status.send(&Status::PullProgress(line.to_owned()))
    })?;
    crate::info!("image ready: {image}");
    let plan = if plan.await_proceed {
        let plan = await_proceed(status, &image)?;
        // Restored from a snapshot (or paused while one was taken): the clock and the CRNG
        // are the snapshot's until the host's plan renews them.
        resync::after_proceed(&plan)?;
        net::set_hostname(plan.hostname.as_deref().unwrap_or("fcvm"))?;
        plan
    } else {
        plan
    };
    // After the final plan: a VM restored from the image cache gets its volumes from the
    // plan in Proceed, and the snapshot never holds a FUSE channel.
    crate::volume::mount_all(&plan, vsock)?;

    let channels = status.0.clone();
    let (gen, output, input) =
        channels.open_streams(plan.interactive || plan.tty, HOST_CONNECT_TIMEOUT)?;
    let mut renewer = OutputRenewer::new(channels.clone(), gen);
    let output = FrameSink::renewing(output, Box::new(move || renewer.renew()));
    let started = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    // The health check's state, sent again after every reconnection.
    let health = plan
        .health_check
        .as_ref()
        .map(|check| health::start(check, status.clone(), done.clone()));
    {
        let (channels, started) = (channels.clone(), started.clone());
        std::thread::Builder::new()
            .name("status-watch".into())
            .spawn(move || watch_status(&channels, &started, health.as_ref()))
            .context("cannot start the status watcher")?;
    }
    // podman's conmon reports the container's start on this socket (`--sdnotify=conmon`):
    // no polling, which would start a podman process every few milliseconds beside the one
    // starting the container.
    let _ = std::fs::remove_file(container::NOTIFY_SOCKET_PATH);
    let notify = UnixDatagram::bind(container::NOTIFY_SOCKET_PATH)
        .context("cannot bind the container start notification socket")?;
    let _ = std::fs::remove_file(container::CIDFILE_PATH);
    let mut cmd = Command::new("podman");
    // podman hands its own proxy variables to the container (its `--http-proxy` default),
    // so giving them to podman is what gives them to the container too.
    cmd.args(container::run_args(&plan, &image))
        .envs(&plan.proxy)
        .env("NOTIFY_SOCKET", container::NOTIFY_SOCKET_PATH);
    let mode = StdioMode {
        tty: plan.tty,
        interactive: plan.interactive,
        size: plan.tty_size,
    };
    let running = Arc::new(crate::process::start(cmd, mode, &output)?);
    *state.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(running.clone());
    crate::info!("podman run started");

    if let Some(mut conn) = input {
        let r = running.clone();
        let tty = plan.tty;
        let mut gen = gen;
        std::thread::spawn(move || loop {
            match read_frame(&mut conn) {
                // podman proxies signals to the container only without a terminal; with -t it
                // would end itself, so the signal goes to the container through podman kill.
                Ok(Some(fcvm_proto::frame::Frame::Signal(n))) if tty => container::kill(n),
                Ok(Some(f)) => r.input(f),
                // A reset (snapshot): read on from the new connection.
                Err(e) if channels_alive(&e) => match channels.input_after(gen) {
                    Some((g, c)) => {
                        crate::info!("input channel renewed");
                        gen = g;
                        conn = c;
                    }
                    None => {
                        r.input(fcvm_proto::frame::Frame::Eof);
                        return;
                    }
                },
                // The host closing its input side ends stdin; the container keeps running.
                Ok(None) | Err(_) => {
                    r.input(fcvm_proto::frame::Frame::Eof);
                    return;
                }
            }
        });
    }
    let ready = {
        let (done, status, started) = (done.clone(), status.clone(), started.clone());
        std::thread::spawn(move || wait_ready(&notify, &done, &status, &started))
    };

    let podman_code = running.wait(Duration::from_secs(2));
    // A second stop signal kills podman, which may have been slow to report a container that
    // had already exited: the container's own code then, not podman's 137.
    let code = if state.count.load(Ordering::SeqCst) >= 2 {
        match container::exit_code_after_podman_was_killed() {
            Some(c) => {
                crate::info!("podman was killed ({podman_code}); the container exited with {c}");
                c
            }
            None => podman_code,
        }
    } else {
        podman_code
    };
    done.store(true, Ordering::SeqCst);
    let _ = ready.join();
    // All output is relayed; the end marker tells the host before it sees the code (a
    // connection that merely ends may be a reset, after which the output goes on).
    output.send(&fcvm_proto::frame::Frame::Eof);
    output.close();
    crate::info!("container exited with {code}");
    status.send(&Status::Exit(code));
    Ok(())
}

/// Reports the image and waits for the host's go-ahead and the run's own plan. The host
/// may snapshot the VM meanwhile; in a VM restored from that snapshot the connection reads
/// as reset, so the agent connects again and repeats the report, and the host answers with
/// its run's plan.
fn await_proceed(status: &StatusSink, image: &str) -> anyhow::Result<Plan> {
    let digest = container::image_id(image)?;
    loop {
        status.send(&Status::ImageReady {
            digest: digest.clone(),
        });
        let (gen, conn) = status.0.status_reader();
        if let Some(mut conn) = conn {
            loop {
                match read_status(&mut conn) {
                    Ok(Some(Status::Proceed(plan))) => {
                        crate::info!("proceeding");
                        return Ok(*plan);
                    }
                    Ok(Some(other)) => crate::info!("ignoring status message {other:?}"),
                    Ok(None) => break,
                    Err(e) => {
                        crate::info!("status connection lost ({e}): reconnecting");
                        break;
                    }
                }
            }
        }
        if !status.0.reconnect(gen) {
            anyhow::bail!("cannot reconnect to the host's status port");
        }
    }
}

/// Whether a read error is a reset connection (which the agent reconnects) rather than
/// garbage on it.
fn channels_alive(e: &fcvm_proto::frame::FrameError) -> bool {
    matches!(
        e,
        fcvm_proto::frame::FrameError::Io(_) | fcvm_proto::frame::FrameError::Truncated
    )
}

/// Reads what the host sends on the status channel once the container's streams are open:
/// Resync after a reconnection (then Ready again, if the container runs). A channel that
/// fails or ends was reset by a snapshot: every channel is reconnected.
fn watch_status(channels: &Channels, started: &AtomicBool, health: Option<&health::Current>) {
    loop {
        let (gen, conn) = channels.status_reader();
        let Some(mut conn) = conn else {
            if !channels.reconnect(gen) {
                std::thread::sleep(Duration::from_secs(1));
            }
            continue;
        };
        loop {
            // Polled with a timeout rather than read blocking: a reader blocked when the
            // reset arrives is not always woken (Firecracker issues 4736 and 4811), while
            // the socket's state, looked at again, shows it.
            if !readable_or_broken(&conn) {
                continue;
            }
            match read_status(&mut conn) {
                Ok(Some(Status::Resync(r))) => {
                    if let Err(e) = resync::apply(r.host_time_ns, r.entropy.as_ref()) {
                        crate::info!("warning: after a reconnection: {e:#}");
                    }
                    if started.load(Ordering::SeqCst) {
                        channels.send_status(&Status::Ready);
                    }
                    if let Some(h) = health {
                        channels.send_status(&Status::Health(h.get()));
                    }
                }
                Ok(Some(other)) => crate::debug!("ignoring status message {other:?}"),
                Ok(None) | Err(_) => break,
            }
        }
        crate::info!("status channel lost: reconnecting");
        if !channels.reconnect(gen) {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Waits up to a second for `conn` to have data, or an error or hangup to show.
fn readable_or_broken(conn: &crate::vsock::Conn) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(1000u16)), Ok(n) if n > 0)
}

/// Reports `ready` once conmon says the container has started (`READY=1` on the notify socket).
fn wait_ready(notify: &UnixDatagram, done: &AtomicBool, status: &StatusSink, started: &AtomicBool) {
    let _ = notify.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    while !done.load(Ordering::SeqCst) {
        let Ok(n) = notify.recv(&mut buf) else {
            continue;
        };
        if is_ready_notification(&buf[..n]) {
            crate::info!("container started");
            started.store(true, Ordering::SeqCst);
            status.send(&Status::Ready);
            return;
        }
    }
}

/// Whether an sd_notify message (newline-separated `KEY=VALUE` pairs) says `READY=1`.
fn is_ready_notification(msg: &[u8]) -> bool {
    String::from_utf8_lossy(msg)
        .lines()
        .any(|l| l.trim() == "READY=1")
}

#[derive(Default)]
struct SignalState {
    running: Mutex<Option<Arc<Running>>>,
    count: AtomicU32,
}

/// SIGINT (Ctrl-Alt-Del from the VMM) or SIGTERM: the first asks the container to stop
/// (podman forwards SIGTERM to it), the second kills podman. Before the container exists the
/// VM is simply powered off.
fn signal_loop(sigs: SigSet, state: Arc<SignalState>, status: StatusSink) {
    loop {
        let Ok(sig) = sigs.wait() else { continue };
        let n = state.count.fetch_add(1, Ordering::SeqCst);
        crate::info!("received {sig}");
        let running = state
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match running {
            Some(r) if n == 0 => r.signal(libc::SIGTERM),
            Some(r) => r.signal(libc::SIGKILL),
            None => {
                status.send(&Status::Error(format!(
                    "stopped by {sig} before the container started"
                )));
                status.send(&Status::Exit(128 + sig as i32));
                power::power_off();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_one_line_of_an_sd_notify_message() {
        assert!(is_ready_notification(b"MAINPID=42\nREADY=1\n"));
        assert!(is_ready_notification(b"READY=1"));
        assert!(!is_ready_notification(b"STATUS=READY=1 soon\nMAINPID=1"));
        assert!(!is_ready_notification(b"READY=0"));
    }
}
