//! `--network bridged` and `--publish` on the real path: a busybox httpd in the container
//! answers on a published TCP port and a UDP echo server (fcvm-test-tool) on a published UDP
//! port from the host side, the container fetches from a server on the
//! host side (egress), and nothing of the network (namespace, veth, nftables table) is left
//! after a normal end, nor after SIGKILL of fcvm and the next command. Needs root and `nft`
//! (Debian package nftables); runs inside the emulated KVM host like `podman_cli`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::podman_cli::{guest_or_skip, wait_exit, wait_healthy, TEST_TOOL};
use crate::common::{scratch_root, wait_until, TestEnv};

/// A free TCP port on the host (bound and released).
pub(super) fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free UDP port on the host (bound and released).
fn free_udp_port() -> u16 {
    UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One datagram to `addr` and its answer, within 3 s; None while nothing answers.
fn udp_ask(addr: &str, text: &str) -> Option<String> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.send_to(text.as_bytes(), addr).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// GET / from `addr`, with bounds on every step; None while it does not answer.
pub(super) fn http_get(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// What fcvm may leave of a VM's network: namespaces, host veth ends, nft tables.
pub(super) fn network_leftovers() -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("fcvm-"))
                .map(|n| format!("netns {n}"))
                .collect()
        })
        .unwrap_or_default();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        if let Some(name) = l.split(": ").nth(1) {
            if name.starts_with("vh") {
                left.push(format!("link {name}"));
            }
        }
    }
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    for l in String::from_utf8_lossy(&tables.stdout).lines() {
        if l.contains("fcvm-") {
            left.push(l.to_owned());
        }
    }
    left
}

#[test]
fn bridged_publish_egress_and_cleanup() {
    let test = "bridged_publish_egress_and_cleanup";
    let Some(guest) = guest_or_skip(test).and_then(|g| g.with_tools(test, &[TEST_TOOL])) else {
        return;
    };
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: needs root and nft under CI"
        );
        eprintln!("SKIPPED {test}: needs root and nft (Debian package nftables)");
        return;
    }
    assert!(
        network_leftovers().is_empty(),
        "before: {:?}",
        network_leftovers()
    );
    let env = TestEnv::new_in(&scratch_root());

    // The host-side server the container fetches from (egress).
    let server = TcpListener::bind("0.0.0.0:0").unwrap();
    let server_port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in server.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello-from-host\n");
        }
    });

    // The container: fetch from the host (its veth end is the gateway minus 4, see
    // network::bridged), echo datagrams on 5353/udp, serve a page on 80, exit once something
    // connects to 81.
    let (web, stop, udp) = (free_port(), free_port(), free_udp_port());
    let script = format!(
        "gw=$(route -n | awk '$1 == \"0.0.0.0\" {{print $2}}'); \
         host=$(echo $gw | awk -F. '{{print $1\".\"$2\".\"$3\".\"($4-4)}}'); \
         echo host: $host; echo wget: $(wget -T 20 -O - http://$host:{server_port}/ 2>&1); \
         echo egress: $(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 $host {server_port} 2>&1); \
         (fcvm-test-tool udp-echo 5353 &) && \
         mkdir -p /www && echo hello-from-guest > /www/index.html && \
         httpd -p 80 -h /www && nc -l -p 81 </dev/null; echo served"
    );
    let publish = format!("{web}:80,{stop}:81,{udp}:5353/udp");
    let mut child = guest
        .run(
            &env,
            "web",
            &["--network", "bridged", "-p", &publish],
            &script,
        )
        .env("FCVM_LOG", "fcvm=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_healthy(&env, "web");
    let vm = env.ls().into_iter().find(|v| v["name"] == "web").unwrap();
    let net = &vm["network"];
    assert_eq!(net["mode"], "bridged", "{vm}");
    assert_eq!(net["publish"][0]["host_port"], web);
    let host_addr = net["host_addr"].as_str().unwrap().to_owned();
    let table = env.ok(&["ls"]);
    assert!(table.contains(&format!("{web}->80/tcp")), "{table}");
    assert!(table.contains(&format!("{udp}->5353/udp")), "{table}");
    assert_eq!(net["publish"][2]["protocol"], "udp", "{vm}");

    // Published port, from the host: on the veth's host address and on localhost.
    for addr in [format!("{host_addr}:{web}"), format!("127.0.0.1:{web}")] {
        let page = wait_until(Duration::from_secs(120), "the published port", || {
            http_get(&addr).filter(|p| p.contains("hello-from-guest"))
        });
        assert!(page.starts_with("HTTP/1."), "{addr}: {page}");
    }
    // The UDP port: every datagram comes back from the container's echo server.
    for addr in [format!("{host_addr}:{udp}"), format!("127.0.0.1:{udp}")] {
        let answer = wait_until(Duration::from_secs(120), "the published UDP port", || {
            udp_ask(&addr, "ping-udp")
        });
        assert_eq!(answer, "echo: ping-udp", "{addr}");
    }
    // Ends the container.
    wait_until(Duration::from_secs(60), "the stop port", || {
        TcpStream::connect_timeout(
            &format!("127.0.0.1:{stop}").parse().unwrap(),
            Duration::from_secs(5),
        )
        .ok()
    });
    let status = wait_exit(&mut child, "fcvm to exit");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    for l in err
        .lines()
        .filter(|l| l.contains("bridged setup") || l.contains("teardown step"))
    {
        eprintln!("timing: {l}");
    }
    assert!(status.success(), "{status}\nstdout: {out}\nstderr: {err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("egress: ") && l.contains("hello-from-host")),
        "stdout: {out}\nstderr: {err}"
    );
    assert!(out.contains("served"), "{out}");
    assert_eq!(
        network_leftovers(),
        Vec::<String>::new(),
        "after a normal end"
    );
    env.assert_clean();

    // SIGKILL of fcvm, then the next command: nothing left either.
    let mut child = guest
        .run(
            &env,
            "killed",
            &["--network", "bridged", "-p", &format!("{web}:80")],
            "sleep 600",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&env, "killed");
    assert!(!network_leftovers().is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = env.ls();
    assert_eq!(
        network_leftovers(),
        Vec::<String>::new(),
        "after SIGKILL + ls"
    );
    env.assert_clean();
}
