//! What a snapshot restore leaves stale in the guest and the host's plan renews: the wall
//! clock (it resumes at the snapshot's time) and the kernel's random number generator (every
//! restore of one snapshot resumes the same CRNG state, so they would all read the same
//! bytes from /dev/urandom and `getrandom`).
//!
//! The guest kernel (Linux 6.1, `crates/fcvm/guest/kernel.fragment`) has no ACPI, so it has
//! no VMGenID driver (`CONFIG_VMGENID` depends on ACPI there) even though Firecracker 1.12
//! writes a VM generation ID on restore: nothing in the kernel reseeds by itself. The agent
//! does it explicitly after every Proceed, which works with any kernel since 4.17.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::Context;
use fcvm_proto::plan::Entropy;
use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` (linux/random.h): add bytes to the input
/// pool and credit them as entropy. Needs CAP_SYS_ADMIN.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)` (linux/random.h, Linux >= 4.17): reseed the CRNG from
/// the input pool now. Needs CAP_SYS_ADMIN.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` (linux/random.h) with room for `N` bytes in its flexible `buf`
/// (`__u32 buf[]` there: `N` must be a multiple of 4, which [`add_entropy`] keeps).
#[repr(C)]
struct RandPoolInfo<const N: usize> {
    /// Bits of entropy credited.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u32; N],
}

/// Largest request [`add_entropy`] sends, in 32-bit words (the plan allows at most
/// [`fcvm_proto::plan::MAX_ENTROPY_BYTES`]).
const POOL_WORDS: usize = fcvm_proto::plan::MAX_ENTROPY_BYTES / 4;

/// Sets `CLOCK_REALTIME` to the host's `host_ns` and returns how far the guest's clock
/// moved (positive: it was behind).
pub fn set_clock(host_ns: u64) -> anyhow::Result<i128> {
    let before = realtime_ns()?;
    let ns = i64::try_from(host_ns).context("host time out of range")?;
    let ts = TimeSpec::new(ns / 1_000_000_000, ns % 1_000_000_000);
    clock_settime(ClockId::CLOCK_REALTIME, ts)
        .context("cannot set the guest's clock (clock_settime CLOCK_REALTIME)")?;
    Ok(i128::from(ns) - before)
}

/// On a cold boot: moves the clock forward to the host's `host_ns` (when it wrote the
/// plan, before the VM started) plus the time since this kernel booted, if the guest's
/// clock is behind that; a clock already at or past it (kvm-clock gave the kernel the
/// host's time) is left alone. Returns how far it moved, if it did.
pub fn clock_at_least(host_ns: u64) -> anyhow::Result<Option<i128>> {
    let up = clock_gettime(ClockId::CLOCK_BOOTTIME).context("cannot read CLOCK_BOOTTIME")?;
    let up = Duration::from(up).as_nanos();
    let floor = u64::try_from(u128::from(host_ns) + up).unwrap_or(u64::MAX);
    let floor = floor.min(i64::MAX as u64);
    if realtime_ns()? >= i128::from(floor) {
        return Ok(None);
    }
    set_clock(floor).map(Some)
}

fn realtime_ns() -> anyhow::Result<i128> {
    let now = clock_gettime(ClockId::CLOCK_REALTIME).context("cannot read CLOCK_REALTIME")?;
    Ok(i128::from(now.tv_sec()) * 1_000_000_000 + i128::from(now.tv_nsec()))
}

/// Adds the host's random bytes to the kernel's input pool, crediting them in full (they
/// come from the host's getrandom), then reseeds the CRNG from it, so the next read of
/// /dev/urandom or `getrandom` differs from every other restore of the same snapshot.
pub fn add_entropy(entropy: &Entropy) -> anyhow::Result<()> {
    let bytes = entropy.bytes();
    anyhow::ensure!(
        bytes.len() <= POOL_WORDS * 4,
        "{} bytes of entropy is more than the {} this agent adds",
        bytes.len(),
        POOL_WORDS * 4
    );
    let req = request::<POOL_WORDS>(bytes);
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .context("cannot open /dev/random")?;
    // SAFETY: `req` is a live, properly aligned `struct rand_pool_info` whose `buf` holds
    // `buf_size` bytes (checked above and in `request`); the kernel only reads it, during
    // the call. The fd is open for the whole call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &raw const req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot add the host's entropy to the kernel's pool (RNDADDENTROPY)");
    }
    reseed_on(&random)
}

/// Reseeds the kernel's CRNG from its input pool now (`RNDRESEEDCRNG`).
fn reseed() -> anyhow::Result<()> {
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .context("cannot open /dev/random")?;
    reseed_on(&random)
}

fn reseed_on(random: &std::fs::File) -> anyhow::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open for the whole call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot reseed the kernel's CRNG (RNDRESEEDCRNG, Linux >= 4.17)");
    }
    Ok(())
}

/// The `RNDADDENTROPY` request for `bytes` (at most `N * 4`; the tail of a last partial
/// word is zero and not counted in `buf_size`), crediting 8 bits per byte.
fn request<const N: usize>(bytes: &[u8]) -> RandPoolInfo<N> {
    assert!(bytes.len() <= N * 4, "entropy request overflows its buffer");
    let mut buf = [0u32; N];
    for (word, chunk) in buf.iter_mut().zip(bytes.chunks(4)) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        // The kernel reads `buf` as bytes: keep them in memory order.
        *word = u32::from_ne_bytes(w);
    }
    // At most MAX_ENTROPY_BYTES (512), so the casts cannot truncate.
    RandPoolInfo {
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf,
    }
}

/// After [`fcvm_proto::status::Status::Proceed`]: the clock and the CRNG from the host's
/// plan. Either failing fails the run: a container must not start with a clock or random
/// numbers cloned from a snapshot.
pub fn after_proceed(plan: &fcvm_proto::plan::Plan) -> anyhow::Result<()> {
    apply(plan.host_time_ns, plan.entropy.as_ref())
}

/// Sets the clock to the host's time and adds the host's entropy (reseeding from the
/// guest's own pool without it): after Proceed, and after a Resync.
pub fn apply(host_time_ns: Option<u64>, entropy: Option<&Entropy>) -> anyhow::Result<()> {
    match host_time_ns {
        Some(ns) => {
            let moved = set_clock(ns)?;
            crate::info!(
                "clock set from the host (moved {:+.3} s)",
                moved as f64 / 1e9
            );
        }
        None => crate::info!("the host sent no time: the clock is left as the snapshot had it"),
    }
    match entropy {
        Some(e) => {
            add_entropy(e)?;
            crate::info!(
                "{} bytes of host entropy added to the kernel's pool and the CRNG reseeded",
                e.bytes().len()
            );
        }
        None => {
            reseed().context("the host sent no entropy")?;
            crate::info!("the host sent no entropy: the CRNG reseeded from the guest's own pool");
        }
    }
    Ok(())
}

/// On a cold boot: [`clock_at_least`] the boot plan's host time. A failure is only logged
/// (the kernel's own clock is then what the container gets).
pub fn after_boot(plan: &fcvm_proto::plan::Plan) {
    let Some(ns) = plan.host_time_ns else { return };
    match clock_at_least(ns) {
        Ok(Some(moved)) => crate::info!(
            "clock was behind the host's: moved {:+.3} s",
            moved as f64 / 1e9
        ),
        Ok(None) => crate::debug!("clock already at or past the host's"),
        Err(e) => crate::info!("warning: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout the kernel's `struct rand_pool_info { int entropy_count; int buf_size;
    /// __u32 buf[]; }` has: two ints, then the bytes at offset 8, 4-byte aligned.
    #[test]
    fn rand_pool_info_has_the_kernel_layout() {
        assert_eq!(std::mem::offset_of!(RandPoolInfo<16>, entropy_count), 0);
        assert_eq!(std::mem::offset_of!(RandPoolInfo<16>, buf_size), 4);
        assert_eq!(std::mem::offset_of!(RandPoolInfo<16>, buf), 8);
        assert_eq!(std::mem::size_of::<RandPoolInfo<16>>(), 8 + 64);
        assert_eq!(std::mem::align_of::<RandPoolInfo<16>>(), 4);
        assert_eq!(
            std::mem::size_of::<RandPoolInfo<POOL_WORDS>>(),
            8 + fcvm_proto::plan::MAX_ENTROPY_BYTES
        );
    }

    /// The ioctl numbers of linux/random.h on x86_64 (`_IOW('R', 3, int[2])`, `_IO('R', 7)`).
    #[test]
    fn ioctl_numbers_are_the_kernel_s() {
        const IOC_WRITE: libc::c_ulong = 1;
        let iow = |nr: libc::c_ulong, size: libc::c_ulong| {
            (IOC_WRITE << 30) | (size << 16) | ((b'R' as libc::c_ulong) << 8) | nr
        };
        let int2 = std::mem::size_of::<[libc::c_int; 2]>() as libc::c_ulong;
        assert_eq!(RNDADDENTROPY, iow(3, int2));
        assert_eq!(RNDRESEEDCRNG, ((b'R' as libc::c_ulong) << 8) | 7);
    }

    #[test]
    fn request_carries_the_bytes_in_order_and_credits_eight_bits_each() {
        let bytes: Vec<u8> = (1..=10).collect();
        let req = request::<4>(&bytes);
        assert_eq!(req.entropy_count, 80);
        assert_eq!(req.buf_size, 10);
        let raw: Vec<u8> = req.buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&raw[..10], &bytes[..]);
        assert_eq!(&raw[10..], [0; 6]);
    }

    #[test]
    #[should_panic(expected = "overflows")]
    fn request_refuses_more_than_its_buffer() {
        let _ = request::<2>(&[0; 9]);
    }
}
