//! The agent initrd: an uncompressed newc cpio archive holding `/init`.
//!
//! The host writes it ([`write_newc`]) and Firecracker hands it to the guest kernel; tests read
//! `/init` back out of it ([`find_file`]). Uncompressed, because unpacking a few MiB
//! costs the kernel less than decompressing them and the file is local.

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A directory with permission bits.
    Dir {
        /// Path without a leading `/`.
        name: &'a str,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path without a leading `/`.
        name: &'a str,
        /// Permission bits.
        mode: u32,
        /// Contents.
        data: &'a [u8],
    },
}

/// Errors reading an archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    /// The data is not a newc archive (bad magic, maybe compressed).
    #[error("Not an uncompressed newc cpio archive at offset {0} (compressed initrds are not supported here)")]
    BadMagic(usize),
    /// A header field is not hexadecimal, or sizes run past the end.
    #[error("Corrupt cpio archive at offset {0}")]
    Corrupt(usize),
    /// The archive ended without a trailer.
    #[error("cpio archive ends without a TRAILER!!! record")]
    NoTrailer,
}

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, filesize: usize, namesize: usize) {
    out.extend_from_slice(MAGIC);
    // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
    // namesize, check. mtime stays 0 so the same agent gives the same bytes.
    for v in [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        filesize as u32,
        0,
        0,
        0,
        0,
        namesize as u32,
        0,
    ] {
        out.extend_from_slice(format!("{v:08x}").as_bytes());
    }
}

fn push(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, name: &str, data: &[u8]) {
    header(out, ino, mode, nlink, data.len(), name.len() + 1);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len() + pad4(HEADER_LEN + name.len() + 1), 0);
    out.extend_from_slice(data);
    out.resize(out.len() + pad4(data.len()), 0);
}

/// Builds a newc archive from `entries` (in order) plus the trailer.
pub fn write_newc(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir { name, mode } => {
                push(&mut out, ino, 0o040000 | (mode & 0o7777), 2, name, &[])
            }
            Entry::File { name, mode, data } => {
                push(&mut out, ino, 0o100000 | (mode & 0o7777), 1, name, data)
            }
        }
    }
    push(&mut out, 0, 0, 1, TRAILER, &[]);
    out
}

fn hex_field(buf: &[u8], at: usize, index: usize) -> Result<usize, CpioError> {
    let start = at + 6 + index * 8;
    let s = buf.get(start..start + 8).ok_or(CpioError::Corrupt(at))?;
    let s = std::str::from_utf8(s).map_err(|_| CpioError::Corrupt(at))?;
    usize::from_str_radix(s, 16).map_err(|_| CpioError::Corrupt(at))
}

/// Returns the contents of the regular file `name` (leading `/` or `./` ignored), or `None`.
pub fn find_file<'a>(archive: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, CpioError> {
    let want = name.trim_start_matches("./").trim_start_matches('/');
    let mut at = 0;
    loop {
        let head = archive
            .get(at..at + HEADER_LEN)
            .ok_or(CpioError::NoTrailer)?;
        if &head[..6] != MAGIC {
            return Err(CpioError::BadMagic(at));
        }
        let mode = hex_field(archive, at, 1)?;
        let filesize = hex_field(archive, at, 6)?;
        let namesize = hex_field(archive, at, 11)?;
        let name_start = at + HEADER_LEN;
        let raw_name = archive
            .get(name_start..name_start + namesize.saturating_sub(1))
            .ok_or(CpioError::Corrupt(at))?;
        let entry_name = std::str::from_utf8(raw_name).map_err(|_| CpioError::Corrupt(at))?;
        let data_start = name_start + namesize + pad4(HEADER_LEN + namesize);
        let data = archive
            .get(data_start..data_start + filesize)
            .ok_or(CpioError::Corrupt(at))?;
        if entry_name == TRAILER {
            return Ok(None);
        }
        let clean = entry_name.trim_start_matches("./").trim_start_matches('/');
        if clean == want && mode & 0o170000 == 0o100000 {
            return Ok(Some(data));
        }
        at = data_start + filesize + pad4(filesize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_padding() {
        for len in 0..9 {
            let data = vec![0xab; len];
            let a = write_newc(&[
                Entry::Dir {
                    name: "dev",
                    mode: 0o755,
                },
                Entry::File {
                    name: "x",
                    mode: 0o644,
                    data: b"odd",
                },
                Entry::File {
                    name: "init",
                    mode: 0o755,
                    data: &data,
                },
            ]);
            assert_eq!(a.len() % 4, 0);
            assert_eq!(find_file(&a, "/init").unwrap(), Some(&data[..]));
            assert_eq!(find_file(&a, "x").unwrap(), Some(&b"odd"[..]));
            assert_eq!(
                find_file(&a, "dev").unwrap(),
                None,
                "directories are not files"
            );
            assert_eq!(find_file(&a, "missing").unwrap(), None);
        }
    }

    #[test]
    fn deterministic() {
        let e = [Entry::File {
            name: "init",
            mode: 0o755,
            data: b"abc",
        }];
        assert_eq!(write_newc(&e), write_newc(&e));
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert_eq!(
            find_file(b"\x1f\x8b\x08\x00 gzip data........", "init"),
            Err(CpioError::NoTrailer)
        );
        let mut gz = vec![0x1f, 0x8b];
        gz.resize(200, 0);
        assert_eq!(find_file(&gz, "init"), Err(CpioError::BadMagic(0)));
        let a = write_newc(&[Entry::File {
            name: "other",
            mode: 0o755,
            data: &[1; 100],
        }]);
        for cut in [50, 120, 200] {
            assert!(find_file(&a[..cut], "init").is_err(), "cut {cut}");
        }
        let mut bad = a.clone();
        bad[6 + 6 * 8] = b'z'; // inside the filesize field
        assert_eq!(find_file(&bad, "init"), Err(CpioError::Corrupt(0)));
    }
}
