//! Build a tiny OCI image archive from the host's static busybox, for demos and tests on
//! hosts without a container registry.
//!
//! `cargo run -p fcvm-testkit --example busybox-image -- OUT.tar [NAME] [TAG]`
//! prints the reference podman will give it (`localhost/NAME:TAG`).

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: busybox-image OUT.tar [NAME] [TAG]");
        return ExitCode::from(2);
    };
    let name = args.get(1).map(String::as_str).unwrap_or("busybox");
    let tag = args.get(2).map(String::as_str).unwrap_or("latest");
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        eprintln!(
            "error: /bin/busybox is missing; install it with `apt-get install busybox-static`"
        );
        return ExitCode::from(1);
    }
    match fcvm_testkit::testimage::build_busybox_archive(busybox, Path::new(out), name, tag) {
        Ok(image) => {
            println!("{}", image.reference);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
