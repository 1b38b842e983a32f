//! The probe's serial output, parsed into typed lines.
//!
//! The guest writes one line per event to COM1 (Firecracker's stdout, or its
//! `serial` output file), each terminated by a single `\n`. Every probe line
//! starts with `PROBE <KIND>` followed by space-separated `key=value` fields
//! in the order below. Decimal numbers are unsigned 64-bit; `<hex16>` is
//! exactly 16 lowercase hex digits.
//!
//! ```text
//! PROBE BANNER boot_id=<hex16> mem_mib=<n> seed=<n> tick_ms=<n> dirty_pages=<n> ram_mib=<n> exit_after=<n> verify_pages=<n> requested_mib=<n> avail_mib=<n> fault_after=<n> id_source=<rdrand|rdtsc>
//! PROBE FILLED pages=<n> checksum=<hex16> ms=<n>
//! PROBE TICK n=<n> gen=<n> verified=<n> bad=<n> checksum=<hex16>
//! PROBE ERROR page=<n> expected=<hex16> found=<hex16> word=<n>
//! PROBE FAULT vector=<n> error=<hex16> rip=<hex16> cr2=<hex16>
//! PROBE SHUTDOWN reason=<exit_after|ctrl-alt-del> n=<n>
//! ```
//!
//! * BANNER values are the effective ones (after the guest's clamping, see
//!   [`crate::ProbeArgs`]); `requested_mib` is what the command line asked
//!   for, `avail_mib` the whole MiB of RAM usable above 2 MiB, `ram_mib` all
//!   e820 RAM rounded up to MiB. `verify_pages` is pages verified per tick.
//! * FILLED comes once, after every page was written with generation 1;
//!   `ms` is the fill time measured with the APIC timer.
//! * TICK `n` counts from 1 and goes up by exactly 1, across pause/resume
//!   and snapshot/restore too; `gen` is the total number of page generations
//!   written (pages + rewrites), `verified` the pages checked in this tick,
//!   `bad` how many of them did not match. See [`crate::model`] for the
//!   `checksum` definition and [`crate::model::ProbeModel`] to recompute it.
//! * ERROR precedes its TICK line, for at most 8 bad pages per tick: the
//!   first differing `word` of `page` (0 magic, 1 index, 2 generation,
//!   3..=511 pattern) with the value it should have and the one found.
//! * FAULT reports a CPU exception (or unexpected interrupt vector) with the
//!   frame's error code (0 if the CPU pushes none), rip and cr2; the guest
//!   then resets, so Firecracker exits 0 right after it. `probe.fault_after`
//!   provokes one on purpose (vector 14, error 7, cr2 0x100000).
//! * SHUTDOWN is the last line before a deliberate reset; `n` is the last
//!   tick started.
//!
//! Other lines (anything not starting with `PROBE `) are not probe output and
//! parse to `None`. Unknown extra `key=value` fields are ignored, so the
//! format may grow without breaking older parsers.

use std::fmt;
use std::str::FromStr;

/// The boot parameters, re-exported next to the output they shape.
pub use crate::args::ProbeArgs;

/// Prefix of every probe line.
pub const LINE_PREFIX: &str = "PROBE ";

/// One parsed probe line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeLine {
    /// First line after boot: effective parameters and the boot id.
    Banner(Banner),
    /// The region was filled with generation 1.
    Filled(Filled),
    /// One timer tick was processed.
    Tick(Tick),
    /// A page failed verification.
    Error(PageError),
    /// A CPU exception; the guest resets after it.
    Fault(Fault),
    /// A deliberate stop; the guest resets after it.
    Shutdown(Shutdown),
}

/// `PROBE BANNER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Banner {
    /// 64-bit id chosen at boot; kept by snapshots (it lives in guest RAM).
    pub boot_id: u64,
    /// MiB of RAM filled (after clamping to `avail_mib`).
    pub mem_mib: u64,
    /// Pattern seed.
    pub seed: u64,
    /// Tick period in ms (after clamping to 1..=60000).
    pub tick_ms: u64,
    /// Pages rewritten per tick.
    pub dirty_pages: u64,
    /// All e820 RAM, rounded up to MiB.
    pub ram_mib: u64,
    /// Ticks before a clean shutdown; 0 means never.
    pub exit_after: u64,
    /// Pages verified per tick.
    pub verify_pages: u64,
    /// `mem_mib` as requested on the command line.
    pub requested_mib: u64,
    /// Whole MiB of RAM usable for the fill.
    pub avail_mib: u64,
    /// Tick after which the guest crashes on purpose; 0 means never.
    pub fault_after: u64,
    /// Where the boot id came from.
    pub id_source: IdSource,
}

impl Banner {
    /// Whether the guest filled less than was requested.
    pub fn clamped(&self) -> bool {
        self.mem_mib < self.requested_mib
    }
}

/// Source of the boot id's randomness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdSource {
    /// `rdrand`, mixed with the TSC.
    Rdrand,
    /// The TSC alone (no working `rdrand`).
    Rdtsc,
}

/// `PROBE FILLED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    /// Pages written.
    pub pages: u64,
    /// Checksum of all pages at generation 1.
    pub checksum: u64,
    /// Fill time in ms.
    pub ms: u64,
}

/// `PROBE TICK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Tick number, from 1.
    pub n: u64,
    /// Page generations written since boot (pages + rewrites).
    pub gen: u64,
    /// Pages verified in this tick.
    pub verified: u64,
    /// Verified pages that did not match.
    pub bad: u64,
    /// Checksum of the verified pages.
    pub checksum: u64,
}

/// `PROBE ERROR`: the first differing word of a bad page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageError {
    /// Page index in the fill region.
    pub page: u64,
    /// Value the word should have.
    pub expected: u64,
    /// Value found.
    pub found: u64,
    /// Word index in the page (0 magic, 1 index, 2 generation, then pattern).
    pub word: u64,
}

/// `PROBE FAULT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Interrupt vector (0..=31 for CPU exceptions).
    pub vector: u64,
    /// Error code pushed by the CPU, 0 if none.
    pub error: u64,
    /// Faulting instruction pointer.
    pub rip: u64,
    /// cr2 (the faulting address for a page fault).
    pub cr2: u64,
}

/// `PROBE SHUTDOWN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// Why the guest stops.
    pub reason: ShutdownReason,
    /// Last tick started.
    pub n: u64,
}

/// Why the guest stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutdownReason {
    /// `probe.exit_after` ticks were reached.
    ExitAfter,
    /// The i8042 delivered data (Firecracker's `SendCtrlAltDel`).
    CtrlAltDel,
}

/// A line that starts like probe output but does not follow the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseLineError {
    /// The line does not start with `PROBE `.
    #[error("not a probe line (no `PROBE ` prefix)")]
    NotProbeLine,
    /// The word after `PROBE` is not a known kind.
    #[error("unknown probe line kind `{0}`: the guest and this parser disagree on the format")]
    UnknownKind(String),
    /// A token is not `key=value`.
    #[error("`{0}` is not a key=value field")]
    BadField(String),
    /// A required field is absent.
    #[error("{kind} line has no `{key}` field (truncated line?)")]
    MissingField {
        /// Line kind.
        kind: &'static str,
        /// Missing key.
        key: &'static str,
    },
    /// A key appears twice.
    #[error("{kind} line has the `{key}` field twice")]
    DuplicateField {
        /// Line kind.
        kind: &'static str,
        /// Repeated key.
        key: String,
    },
    /// A value does not have the expected shape.
    #[error("field `{key}` has value `{value}`, expected {expected}")]
    BadValue {
        /// Key.
        key: &'static str,
        /// Value found.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// The `key=value` fields of one line.
struct Fields<'a> {
    kind: &'static str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Fields<'a> {
    fn new(kind: &'static str, rest: &'a str) -> Result<Self, ParseLineError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for token in rest.split_ascii_whitespace() {
            let (key, value) = token
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ParseLineError::BadField(token.to_owned()))?;
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(ParseLineError::DuplicateField {
                    kind,
                    key: key.to_owned(),
                });
            }
            pairs.push((key, value));
        }
        Ok(Self { kind, pairs })
    }

    fn text(&self, key: &'static str) -> Result<&'a str, ParseLineError> {
        self.pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or(ParseLineError::MissingField {
                kind: self.kind,
                key,
            })
    }

    fn number(&self, key: &'static str, radix: u32) -> Result<u64, ParseLineError> {
        let value = self.text(key)?;
        let expected = if radix == 16 {
            "hexadecimal u64"
        } else {
            "decimal u64"
        };
        let digits_ok = !value.is_empty() && value.chars().all(|c| c.is_digit(radix));
        digits_ok
            .then(|| u64::from_str_radix(value, radix).ok())
            .flatten()
            .ok_or_else(|| ParseLineError::BadValue {
                key,
                value: value.to_owned(),
                expected,
            })
    }

    fn dec(&self, key: &'static str) -> Result<u64, ParseLineError> {
        self.number(key, 10)
    }

    fn hex(&self, key: &'static str) -> Result<u64, ParseLineError> {
        self.number(key, 16)
    }
}

impl ProbeLine {
    /// Parses one serial line (a trailing `\n` or `\r\n` is fine).
    ///
    /// Returns `Ok(None)` for lines that are not probe output, and an error
    /// for lines that start with `PROBE ` but break the format.
    pub fn parse(line: &str) -> Result<Option<Self>, ParseLineError> {
        let line = line.trim_end_matches(['\n', '\r']);
        let Some(rest) = line.strip_prefix(LINE_PREFIX) else {
            return Ok(None);
        };
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let parsed = match kind {
            "BANNER" => {
                let f = Fields::new("BANNER", rest)?;
                let id_source = match f.text("id_source")? {
                    "rdrand" => IdSource::Rdrand,
                    "rdtsc" => IdSource::Rdtsc,
                    other => {
                        return Err(ParseLineError::BadValue {
                            key: "id_source",
                            value: other.to_owned(),
                            expected: "`rdrand` or `rdtsc`",
                        })
                    }
                };
                Self::Banner(Banner {
                    boot_id: f.hex("boot_id")?,
                    mem_mib: f.dec("mem_mib")?,
                    seed: f.dec("seed")?,
                    tick_ms: f.dec("tick_ms")?,
                    dirty_pages: f.dec("dirty_pages")?,
                    ram_mib: f.dec("ram_mib")?,
                    exit_after: f.dec("exit_after")?,
                    verify_pages: f.dec("verify_pages")?,
                    requested_mib: f.dec("requested_mib")?,
                    avail_mib: f.dec("avail_mib")?,
                    fault_after: f.dec("fault_after")?,
                    id_source,
                })
            }
            "FILLED" => {
                let f = Fields::new("FILLED", rest)?;
                Self::Filled(Filled {
                    pages: f.dec("pages")?,
                    checksum: f.hex("checksum")?,
                    ms: f.dec("ms")?,
                })
            }
            "TICK" => {
                let f = Fields::new("TICK", rest)?;
                Self::Tick(Tick {
                    n: f.dec("n")?,
                    gen: f.dec("gen")?,
                    verified: f.dec("verified")?,
                    bad: f.dec("bad")?,
                    checksum: f.hex("checksum")?,
                })
            }
            "ERROR" => {
                let f = Fields::new("ERROR", rest)?;
                Self::Error(PageError {
                    page: f.dec("page")?,
                    expected: f.hex("expected")?,
                    found: f.hex("found")?,
                    word: f.dec("word")?,
                })
            }
            "FAULT" => {
                let f = Fields::new("FAULT", rest)?;
                Self::Fault(Fault {
                    vector: f.dec("vector")?,
                    error: f.hex("error")?,
                    rip: f.hex("rip")?,
                    cr2: f.hex("cr2")?,
                })
            }
            "SHUTDOWN" => {
                let f = Fields::new("SHUTDOWN", rest)?;
                let reason = match f.text("reason")? {
                    "exit_after" => ShutdownReason::ExitAfter,
                    "ctrl-alt-del" => ShutdownReason::CtrlAltDel,
                    other => {
                        return Err(ParseLineError::BadValue {
                            key: "reason",
                            value: other.to_owned(),
                            expected: "`exit_after` or `ctrl-alt-del`",
                        })
                    }
                };
                Self::Shutdown(Shutdown {
                    reason,
                    n: f.dec("n")?,
                })
            }
            other => return Err(ParseLineError::UnknownKind(other.to_owned())),
        };
        Ok(Some(parsed))
    }

    /// Parses every probe line of a captured serial log, skipping other
    /// lines. A final line without `\n` is included.
    pub fn parse_all(text: &str) -> Result<Vec<Self>, ParseLineError> {
        text.lines()
            .filter_map(|line| Self::parse(line).transpose())
            .collect()
    }
}

impl FromStr for ProbeLine {
    type Err = ParseLineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)?.ok_or(ParseLineError::NotProbeLine)
    }
}

impl fmt::Display for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rdrand => "rdrand",
            Self::Rdtsc => "rdtsc",
        })
    }
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ExitAfter => "exit_after",
            Self::CtrlAltDel => "ctrl-alt-del",
        })
    }
}

/// Renders the line exactly as the guest prints it, without the `\n`.
impl fmt::Display for ProbeLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(LINE_PREFIX)?;
        match self {
            Self::Banner(b) => write!(
                f,
                "BANNER boot_id={:016x} mem_mib={} seed={} tick_ms={} dirty_pages={} ram_mib={} \
                 exit_after={} verify_pages={} requested_mib={} avail_mib={} fault_after={} id_source={}",
                b.boot_id,
                b.mem_mib,
                b.seed,
                b.tick_ms,
                b.dirty_pages,
                b.ram_mib,
                b.exit_after,
                b.verify_pages,
                b.requested_mib,
                b.avail_mib,
                b.fault_after,
                b.id_source
            ),
            Self::Filled(x) => write!(
                f,
                "FILLED pages={} checksum={:016x} ms={}",
                x.pages, x.checksum, x.ms
            ),
            Self::Tick(t) => write!(
                f,
                "TICK n={} gen={} verified={} bad={} checksum={:016x}",
                t.n, t.gen, t.verified, t.bad, t.checksum
            ),
            Self::Error(e) => write!(
                f,
                "ERROR page={} expected={:016x} found={:016x} word={}",
                e.page, e.expected, e.found, e.word
            ),
            Self::Fault(x) => write!(
                f,
                "FAULT vector={} error={:016x} rip={:016x} cr2={:016x}",
                x.vector, x.error, x.rip, x.cr2
            ),
            Self::Shutdown(s) => write!(f, "SHUTDOWN reason={} n={}", s.reason, s.n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as the guest printed them under Firecracker v1.12.1.
    const BANNER: &str = "PROBE BANNER boot_id=aa195a8674fb05c2 mem_mib=64 seed=1 tick_ms=100 \
        dirty_pages=3 ram_mib=128 exit_after=5 verify_pages=16384 requested_mib=64 \
        avail_mib=126 fault_after=0 id_source=rdrand";

    #[test]
    fn parses_a_banner() {
        let line = ProbeLine::parse(BANNER).unwrap().unwrap();
        let ProbeLine::Banner(b) = line else {
            panic!("not a banner: {line:?}")
        };
        assert_eq!(
            b,
            Banner {
                boot_id: 0xaa19_5a86_74fb_05c2,
                mem_mib: 64,
                seed: 1,
                tick_ms: 100,
                dirty_pages: 3,
                ram_mib: 128,
                exit_after: 5,
                verify_pages: 16384,
                requested_mib: 64,
                avail_mib: 126,
                fault_after: 0,
                id_source: IdSource::Rdrand,
            }
        );
        assert!(!b.clamped());
    }

    #[test]
    fn parses_every_other_kind() {
        let cases = [
            (
                "PROBE FILLED pages=16384 checksum=4c3e856b632d26fb ms=214\n",
                ProbeLine::Filled(Filled {
                    pages: 16384,
                    checksum: 0x4c3e_856b_632d_26fb,
                    ms: 214,
                }),
            ),
            (
                "PROBE TICK n=2 gen=16390 verified=16384 bad=0 checksum=e0c1c87adefec438\r\n",
                ProbeLine::Tick(Tick {
                    n: 2,
                    gen: 16390,
                    verified: 16384,
                    bad: 0,
                    checksum: 0xe0c1_c87a_defe_c438,
                }),
            ),
            (
                "PROBE ERROR page=100 expected=00000000000000ff found=0000000000000000 word=10",
                ProbeLine::Error(PageError {
                    page: 100,
                    expected: 0xff,
                    found: 0,
                    word: 10,
                }),
            ),
            (
                "PROBE FAULT vector=14 error=0000000000000005 rip=000000000010016d cr2=000000000010016d",
                ProbeLine::Fault(Fault {
                    vector: 14,
                    error: 5,
                    rip: 0x10_016d,
                    cr2: 0x10_016d,
                }),
            ),
            (
                "PROBE SHUTDOWN reason=exit_after n=5",
                ProbeLine::Shutdown(Shutdown {
                    reason: ShutdownReason::ExitAfter,
                    n: 5,
                }),
            ),
            (
                "PROBE SHUTDOWN reason=ctrl-alt-del n=17",
                ProbeLine::Shutdown(Shutdown {
                    reason: ShutdownReason::CtrlAltDel,
                    n: 17,
                }),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(ProbeLine::parse(text), Ok(Some(want)), "{text}");
            assert_eq!(text.trim_end(), want.to_string(), "renders back");
        }
        assert_eq!(
            BANNER,
            ProbeLine::parse(BANNER).unwrap().unwrap().to_string()
        );
    }

    #[test]
    fn other_output_is_not_probe_output() {
        for line in [
            "",
            "PROBE",
            "probe TICK n=1",
            "d=16384 bad=0 checksum=00",
            "[    0.0] Linux",
        ] {
            assert_eq!(ProbeLine::parse(line), Ok(None), "{line:?}");
        }
        assert_eq!(
            "hello".parse::<ProbeLine>(),
            Err(ParseLineError::NotProbeLine)
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_order_does_not_matter() {
        let line = "PROBE TICK checksum=0000000000000001 future=yes n=3 bad=0 verified=8 gen=9";
        assert_eq!(
            ProbeLine::parse(line),
            Ok(Some(ProbeLine::Tick(Tick {
                n: 3,
                gen: 9,
                verified: 8,
                bad: 0,
                checksum: 1
            })))
        );
    }

    #[test]
    fn malformed_probe_lines_are_errors() {
        let err = |line: &str| ProbeLine::parse(line).unwrap_err();
        assert_eq!(
            err("PROBE WHAT x=1"),
            ParseLineError::UnknownKind("WHAT".into())
        );
        assert_eq!(
            err("PROBE TICK n=1 gen=2 verified=3 bad=0"),
            ParseLineError::MissingField {
                kind: "TICK",
                key: "checksum"
            }
        );
        assert_eq!(
            err("PROBE FILLED pages=1 checksum"),
            ParseLineError::BadField("checksum".into())
        );
        assert_eq!(
            err("PROBE FILLED =1"),
            ParseLineError::BadField("=1".into())
        );
        assert!(matches!(
            err("PROBE FILLED pages=1 pages=2 checksum=0 ms=0"),
            ParseLineError::DuplicateField { key, .. } if key == "pages"
        ));
        for bad in [
            "pages=-1",
            "pages=+1",
            "pages=1x",
            "pages=",
            "pages=18446744073709551616",
        ] {
            assert!(
                matches!(
                    err(&format!("PROBE FILLED {bad} checksum=0 ms=0")),
                    ParseLineError::BadValue { key: "pages", .. }
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            err("PROBE FILLED pages=1 checksum=+f ms=0"),
            ParseLineError::BadValue {
                key: "checksum",
                ..
            }
        ));
        assert!(matches!(
            err("PROBE FILLED pages=1 checksum=10000000000000000 ms=0"),
            ParseLineError::BadValue {
                key: "checksum",
                ..
            }
        ));
        assert!(matches!(
            err("PROBE SHUTDOWN reason=bored n=1"),
            ParseLineError::BadValue { key: "reason", .. }
        ));
        assert!(matches!(
            err(&BANNER.replace("rdrand", "dice")),
            ParseLineError::BadValue {
                key: "id_source",
                ..
            }
        ));
    }

    #[test]
    fn parse_all_keeps_probe_lines_in_order() {
        let log = format!(
            "{BANNER}\nnoise\nPROBE FILLED pages=1 checksum=0000000000000002 ms=3\n\
             PROBE TICK n=1 gen=1 verified=1 bad=0 checksum=0000000000000002"
        );
        let lines = ProbeLine::parse_all(&log).unwrap();
        assert_eq!(lines.len(), 3);
        assert!(matches!(lines[0], ProbeLine::Banner(_)));
        assert!(matches!(lines[2], ProbeLine::Tick(Tick { n: 1, .. })));
    }
}
