//! The exec server on vsock port 4998 (protocol in `fcvm_proto::exec`).

use std::time::Duration;

use fcvm_proto::frame::{read_frame, Frame};
use fcvm_proto::vsock::EXEC_PORT;

use crate::container::exec_command;
use crate::process::{self, FrameSink, StdioMode};
use crate::vsock::{Conn, Listener, Vsock, VsockError};

/// Starts listening and serves connections on a background thread.
pub fn serve(vsock: Vsock) -> Result<(), VsockError> {
    let listener = vsock.listen(EXEC_PORT)?;
    std::thread::Builder::new()
        .name("exec-server".into())
        .spawn(move || accept_loop(listener))
        .map_err(|e| VsockError::Sys {
            op: "thread",
            port: EXEC_PORT,
            source: e,
        })?;
    Ok(())
}

fn accept_loop(listener: Listener) {
    loop {
        match listener.accept() {
            Ok(conn) => {
                let _ = std::thread::Builder::new()
                    .name("exec".into())
                    .spawn(move || handle(conn));
            }
            Err(e) => {
                crate::info!("exec accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle(mut conn: Conn) {
    let Ok(writer) = conn.try_clone() else { return };
    let sink = FrameSink::new(writer);
    let req = match read_frame(&mut conn) {
        Ok(Some(Frame::Exec(req))) => req,
        Ok(Some(other)) => {
            sink.send(&Frame::Error(format!(
                "expected an Exec frame first, got {other:?}"
            )));
            return;
        }
        Ok(None) => return,
        Err(e) => {
            sink.send(&Frame::Error(e.to_string()));
            return;
        }
    };
    crate::debug!(
        "exec {:?} (container: {}, tty: {})",
        req.command,
        req.in_container,
        req.tty
    );
    let mode = StdioMode {
        tty: req.tty,
        interactive: req.interactive,
        size: req.tty_size,
    };
    let running = match process::start(exec_command(&req), mode, &sink) {
        Ok(r) => std::sync::Arc::new(r),
        Err(e) => {
            sink.send(&Frame::Error(e.to_string()));
            return;
        }
    };
    let Ok(ctl) = conn.try_clone() else { return };
    let input_side = running.clone();
    let input_thread = std::thread::spawn(move || loop {
        match read_frame(&mut conn) {
            Ok(Some(f)) => input_side.input(f),
            // The host went away (or sent garbage) before the end: nobody will read the
            // result, so stop the command rather than leave it running. After the exit code
            // was collected this is a no-op.
            Ok(None) | Err(_) => {
                input_side.signal(libc::SIGKILL);
                return;
            }
        }
    });
    let code = running.wait(Duration::from_millis(500));
    sink.send(&Frame::Exit(code));
    sink.close();
    // Unblocks the input thread.
    ctl.shutdown_both();
    let _ = input_thread.join();
}
