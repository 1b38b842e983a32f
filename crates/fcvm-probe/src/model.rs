//! Reference model of the probe's memory pattern and checksums.
//!
//! This is the host-side twin of the ring-3 code in `src/probe.S`; the two
//! must agree bit for bit, and the real-Firecracker tests check that they do.
//!
//! # Page pattern
//!
//! The fill region is `N = mem_mib * 256` pages of 4 KiB, taken in order
//! from the guest's RAM at or above 2 MiB (skipping non-RAM holes such as
//! the MMIO gap below 4 GiB). Page `i` with generation `g` holds 512
//! little-endian u64 words:
//!
//! | word      | value |
//! |-----------|-------|
//! | 0         | [`PAGE_MAGIC`] (`"PROBEPG1"` in memory) |
//! | 1         | `i` |
//! | 2         | `g` |
//! | 3..=511   | `x = xorshift64(x)` starting from `x = page_seed(seed, i, g)` |
//!
//! where `page_seed = mix64(seed ^ i*0x9e3779b97f4a7c15 ^ g*0xd1b54a32d192ed03)`
//! (wrapping multiplications, replaced by [`PAGE_MAGIC`] if it is 0),
//! [`mix64`] is the splitmix64 finaliser and xorshift64 uses shifts
//! (13, 7, 17). A zero page can never match (its magic is wrong).
//!
//! # Generations
//!
//! The fill writes generation 1 everywhere. Each tick first rewrites
//! `dirty_pages` pages at a cursor that walks the region cyclically, each
//! with its current generation + 1. After `W = tick * dirty_pages` rewrites
//! page `i` has generation `1 + W / N + (i < W % N ? 1 : 0)`, and the total
//! number of page generations written (`gen=` in TICK lines) is `N + W`.
//!
//! # Checksum
//!
//! `page_sum(i)` is the wrapping sum of the page's 512 words as the guest
//! reads them; the checksum is the wrapping sum of `mix64(page_sum(i))` over
//! the pages covered. FILLED covers all pages (all at generation 1). TICK `n`
//! covers the pages verified in that tick, read after that tick's rewrites:
//! the window of `V = verify_pages` pages (all `N` pages by default)
//! starting at page `((n - 1) * V) % N` and wrapping around. Because the sum
//! is over the words actually read, corruption changes the checksum even
//! though the `bad=` count is what reports it.

use crate::output::{Banner, Tick};
use crate::ProbeArgs;

/// Bytes per pattern page.
pub const PAGE_SIZE: u64 = 4096;
/// u64 words per pattern page.
pub const PAGE_WORDS: usize = 512;
/// Words 0..3 are the header: magic, index, generation.
pub const HEADER_WORDS: usize = 3;
/// Word 0 of every pattern page (`"PROBEPG1"` as little-endian bytes).
pub const PAGE_MAGIC: u64 = 0x3147_5045_424f_5250;
/// Pages per MiB of fill region.
pub const PAGES_PER_MIB: u64 = 256;

const INDEX_MULT: u64 = 0x9e37_79b9_7f4a_7c15;
const GEN_MULT: u64 = 0xd1b5_4a32_d192_ed03;

/// splitmix64's output function (a bijection on u64).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn xorshift64(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^ (x << 17)
}

/// Start state of the word stream of page `index` at `generation`.
pub fn page_seed(seed: u64, index: u64, generation: u64) -> u64 {
    let x = mix64(seed ^ index.wrapping_mul(INDEX_MULT) ^ generation.wrapping_mul(GEN_MULT));
    if x == 0 {
        PAGE_MAGIC
    } else {
        x
    }
}

/// The 512 words of page `index` at `generation`.
pub fn page_words(seed: u64, index: u64, generation: u64) -> [u64; PAGE_WORDS] {
    let mut words = [0u64; PAGE_WORDS];
    words[0] = PAGE_MAGIC;
    words[1] = index;
    words[2] = generation;
    let mut x = page_seed(seed, index, generation);
    for word in &mut words[HEADER_WORDS..] {
        x = xorshift64(x);
        *word = x;
    }
    words
}

/// The page as the bytes found in guest memory (or a snapshot memory file).
pub fn page_bytes(seed: u64, index: u64, generation: u64) -> Vec<u8> {
    page_words(seed, index, generation)
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Wrapping sum of the words of an intact page.
pub fn page_sum(seed: u64, index: u64, generation: u64) -> u64 {
    let mut sum = PAGE_MAGIC.wrapping_add(index).wrapping_add(generation);
    let mut x = page_seed(seed, index, generation);
    for _ in HEADER_WORDS..PAGE_WORDS {
        x = xorshift64(x);
        sum = sum.wrapping_add(x);
    }
    sum
}

/// What an intact probe prints, from the parameters it really uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeModel {
    pages: u64,
    seed: u64,
    dirty_pages: u64,
    verify_pages: u64,
}

impl ProbeModel {
    /// A model for `pages` pages; normalises `dirty_pages` and
    /// `verify_pages` the way the guest does.
    pub fn new(pages: u64, seed: u64, dirty_pages: u64, verify_pages: u64) -> Self {
        let dirty_pages = if pages == 0 { 0 } else { dirty_pages };
        let verify_pages = if verify_pages == 0 || verify_pages > pages {
            pages
        } else {
            verify_pages
        };
        Self {
            pages,
            seed,
            dirty_pages,
            verify_pages,
        }
    }

    /// A model from the requested parameters. Only right when the guest did
    /// not clamp `mem_mib` (it has that much RAM above 2 MiB); prefer
    /// [`ProbeModel::from_banner`] when the banner is at hand.
    pub fn from_args(args: &ProbeArgs) -> Self {
        Self::new(
            args.mem_mib.saturating_mul(PAGES_PER_MIB),
            args.seed,
            args.dirty_pages,
            args.verify_pages,
        )
    }

    /// A model from the effective parameters the guest printed.
    pub fn from_banner(banner: &Banner) -> Self {
        Self::new(
            banner.mem_mib.saturating_mul(PAGES_PER_MIB),
            banner.seed,
            banner.dirty_pages,
            banner.verify_pages,
        )
    }

    /// Pages in the fill region (`N`).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages verified (and covered by the checksum) per tick (`V`).
    pub fn verify_pages(&self) -> u64 {
        self.verify_pages
    }

    /// Page rewrites done by the end of `tick` (`W`).
    pub fn writes(&self, tick: u64) -> u64 {
        tick.wrapping_mul(self.dirty_pages)
    }

    /// Generation of `page` at the end of `tick` (tick 0 is the fill).
    pub fn generation(&self, page: u64, tick: u64) -> u64 {
        let w = self.writes(tick);
        let extra = u64::from(page < w % self.pages.max(1));
        1 + w / self.pages.max(1) + extra
    }

    /// Total page generations written by the end of `tick` (`gen=`).
    pub fn total_generations(&self, tick: u64) -> u64 {
        self.pages.wrapping_add(self.writes(tick))
    }

    /// First page of the verification window of `tick` (>= 1).
    pub fn window_start(&self, tick: u64) -> u64 {
        if self.pages == 0 {
            return 0;
        }
        let start = u128::from(tick.saturating_sub(1)) * u128::from(self.verify_pages);
        // The remainder is below `pages`, so it fits in a u64.
        (start % u128::from(self.pages)) as u64
    }

    /// Checksum of `count` pages from `start` (wrapping) at the end of `tick`.
    fn checksum_of(&self, start: u64, count: u64, tick: u64) -> u64 {
        let mut sum = 0u64;
        let mut page = start;
        for _ in 0..count {
            let generation = self.generation(page, tick);
            sum = sum.wrapping_add(mix64(page_sum(self.seed, page, generation)));
            page += 1;
            if page == self.pages {
                page = 0;
            }
        }
        sum
    }

    /// `checksum=` of the FILLED line.
    pub fn filled_checksum(&self) -> u64 {
        self.checksum_of(0, self.pages, 0)
    }

    /// The TICK line an intact probe prints for tick `n` (>= 1).
    pub fn expected_tick(&self, n: u64) -> Tick {
        Tick {
            n,
            gen: self.total_generations(n),
            verified: self.verify_pages,
            bad: 0,
            checksum: self.checksum_of(self.window_start(n), self.verify_pages, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_brute_force(m: &ProbeModel, tick: u64) -> u64 {
        // Simulate the guest step by step with an explicit generation table.
        let n = m.pages;
        let mut generations = vec![1u64; n as usize];
        let mut cursor = 0u64;
        let mut vcursor = 0u64;
        let mut checksum = 0u64;
        for _ in 1..=tick {
            for _ in 0..m.dirty_pages {
                generations[cursor as usize] += 1;
                cursor = (cursor + 1) % n;
            }
            checksum = 0;
            for _ in 0..m.verify_pages {
                let words = page_words(m.seed, vcursor, generations[vcursor as usize]);
                let sum = words.iter().fold(0u64, |a, w| a.wrapping_add(*w));
                checksum = checksum.wrapping_add(mix64(sum));
                vcursor = (vcursor + 1) % n;
            }
        }
        checksum
    }

    #[test]
    fn mix64_matches_the_splitmix64_reference_output() {
        // splitmix64 seeded with 0 returns mix64(0x9e3779b97f4a7c15) first;
        // that first output is the published 0xe220a8397b1dcdaf.
        assert_eq!(mix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(0), 0);
    }

    #[test]
    fn pages_describe_themselves() {
        let w = page_words(7, 1234, 5);
        assert_eq!(&w[..3], &[PAGE_MAGIC, 1234, 5]);
        assert_eq!(&page_bytes(7, 1234, 5)[..8], b"PROBEPG1");
        assert!(w[3..].iter().all(|&x| x != 0));
        assert_ne!(w, page_words(7, 1234, 6), "generation changes the page");
        assert_ne!(w, page_words(8, 1234, 5), "seed changes the page");
        assert_eq!(
            page_sum(7, 1234, 5),
            w.iter().fold(0u64, |a, x| a.wrapping_add(*x))
        );
    }

    #[test]
    fn generations_follow_the_cyclic_cursor() {
        let m = ProbeModel::new(10, 1, 4, 0);
        // After 3 ticks: 12 rewrites = one full pass plus pages 0 and 1.
        let gens: Vec<u64> = (0..10).map(|p| m.generation(p, 3)).collect();
        assert_eq!(gens, vec![3, 3, 2, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(m.total_generations(3), 22);
        assert_eq!(gens.iter().sum::<u64>(), m.total_generations(3));
    }

    #[test]
    fn tick_checksums_match_a_step_by_step_simulation() {
        for (pages, dirty, verify) in [(16, 0, 0), (16, 5, 0), (16, 3, 5), (7, 20, 3), (16, 16, 16)]
        {
            let m = ProbeModel::new(pages, 42, dirty, verify);
            for tick in 1..=9 {
                assert_eq!(
                    m.expected_tick(tick).checksum,
                    checksum_brute_force(&m, tick),
                    "pages={pages} dirty={dirty} verify={verify} tick={tick}"
                );
            }
        }
    }

    #[test]
    fn checksum_identifies_the_state() {
        let m = ProbeModel::new(64, 1, 3, 0);
        let sums: Vec<u64> = (1..=5).map(|t| m.expected_tick(t).checksum).collect();
        let mut unique = sums.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), sums.len(), "every tick has its own checksum");
        assert_ne!(
            m.filled_checksum(),
            ProbeModel::new(64, 2, 3, 0).filled_checksum()
        );
        // Without rewrites the state never changes, nor does the checksum.
        let still = ProbeModel::new(64, 1, 0, 0);
        assert_eq!(still.expected_tick(1).checksum, still.filled_checksum());
        assert_eq!(still.expected_tick(9).checksum, still.filled_checksum());
    }

    #[test]
    fn normalises_like_the_guest() {
        let m = ProbeModel::new(100, 1, 5, 0);
        assert_eq!(m.verify_pages(), 100);
        assert_eq!(ProbeModel::new(100, 1, 5, 101).verify_pages(), 100);
        let empty = ProbeModel::new(0, 1, 5, 0);
        assert_eq!(
            empty.expected_tick(3),
            Tick {
                n: 3,
                gen: 0,
                verified: 0,
                bad: 0,
                checksum: 0
            }
        );
        assert_eq!(ProbeModel::new(10, 1, 0, 4).window_start(4), 2);
    }
}

#[cfg(test)]
mod guest_values {
    use super::*;

    /// Values printed by the real guest under Firecracker v1.12.1 for
    /// `probe.mem_mib=64 probe.seed=1 probe.dirty_pages=3`: they pin the
    /// model to the assembly, independently of the integration tests.
    #[test]
    fn matches_values_printed_by_the_guest() {
        let m = ProbeModel::new(64 * PAGES_PER_MIB, 1, 3, 0);
        assert_eq!(m.filled_checksum(), 0x4c3e_856b_632d_26fb);
        let ticks = [
            (1, 16387, 0xa479_6e5b_5a30_b34c),
            (2, 16390, 0xe0c1_c87a_defe_c438),
            (5, 16399, 0x5e85_a7d1_8c9e_760d),
        ];
        for (n, gen, checksum) in ticks {
            let t = m.expected_tick(n);
            assert_eq!(
                (t.gen, t.verified, t.checksum),
                (gen, 16384, checksum),
                "tick {n}"
            );
        }
    }
}
