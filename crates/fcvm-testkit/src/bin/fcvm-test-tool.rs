//! What the tests' busybox image lacks, as one static binary put into the image at
//! `/bin/fcvm-test-tool` (busybox-static in Debian has no UDP server and nothing that writes
//! through a shared mapping):
//!
//! - `udp-echo PORT`: answer every datagram on 0.0.0.0:PORT with `echo: ` and its bytes.
//! - `mmap-write FILE OFFSET TEXT`: write TEXT into FILE at OFFSET through a shared mapping
//!   (the file grows to fit), `msync` it, and print `mmap-write ok`.
//!
//! Built like the agent (`+crt-static`, `--target x86_64-unknown-linux-gnu`), since the image
//! has no C library.

use std::fs::OpenOptions;
use std::net::UdpSocket;
use std::num::NonZeroUsize;
use std::process::ExitCode;

use nix::sys::mman::{mmap, msync, munmap, MapFlags, MsFlags, ProtFlags};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["udp-echo", port] => udp_echo(port),
        ["mmap-write", file, offset, text] => mmap_write(file, offset, text),
        _ => Err("usage: fcvm-test-tool udp-echo PORT | mmap-write FILE OFFSET TEXT".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fcvm-test-tool: {e}");
            ExitCode::from(1)
        }
    }
}

fn udp_echo(port: &str) -> Result<(), String> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let socket =
        UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("cannot bind udp {port}: {e}"))?;
    println!("udp-echo listening on {port}");
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recv: {e}"))?;
        let mut reply = b"echo: ".to_vec();
        reply.extend_from_slice(&buf[..n]);
        // A reply that cannot be sent (the peer went) is the peer's problem, not the server's.
        if let Err(e) = socket.send_to(&reply, from) {
            eprintln!("udp-echo: send to {from}: {e}");
        }
    }
}

fn mmap_write(file: &str, offset: &str, text: &str) -> Result<(), String> {
    let offset: usize = offset
        .parse()
        .map_err(|_| format!("bad offset {offset:?}"))?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .map_err(|e| format!("open {file}: {e}"))?;
    let end = offset + text.len();
    let len = f.metadata().map_err(|e| format!("stat {file}: {e}"))?.len();
    if (len as usize) < end {
        f.set_len(end as u64)
            .map_err(|e| format!("grow {file}: {e}"))?;
    }
    let size = NonZeroUsize::new(end).ok_or("nothing to write")?;
    // SAFETY: a fresh shared mapping of `end` bytes of a file at least that long, not aliased
    // by any Rust reference; it is written only inside its bounds below and unmapped before
    // the function returns.
    let map = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &f,
            0,
        )
    }
    .map_err(|e| format!("mmap {file}: {e}"))?;
    // SAFETY: `map` is valid for `end` bytes and `offset + text.len() == end`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            text.as_ptr(),
            map.as_ptr().cast::<u8>().add(offset),
            text.len(),
        );
    }
    // SAFETY: `map` and `end` are the mapping made above.
    let synced = unsafe { msync(map, end, MsFlags::MS_SYNC) };
    // SAFETY: as above; nothing uses the mapping after this.
    unsafe { munmap(map, end) }.map_err(|e| format!("munmap: {e}"))?;
    synced.map_err(|e| format!("msync {file}: {e}"))?;
    println!("mmap-write ok");
    Ok(())
}
