//! The memory workload (`thaw.fill-mib=N`): fills a buffer with the mix a function's memory
//! holds after init — untouched (zero) pages, text-like pages that compress well, random pages
//! that do not — and checksums it, so a snapshot's codec has realistic input and a restore can
//! prove every byte came back. The contents depend only on the page index, so the same
//! command line always produces the same memory and the same checksum.

/// Bytes in a page.
pub const PAGE: usize = 4096;

/// What a page of the workload holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// Never written.
    Zero,
    /// Words and spaces: compresses several times over.
    Text,
    /// Pseudo-random bytes: does not compress.
    Random,
}

/// Counts of each kind of page in a fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mix {
    /// Zero pages.
    pub zero: usize,
    /// Text-like pages.
    pub text: usize,
    /// Random pages.
    pub random: usize,
}

/// splitmix64: a well-mixed 64-bit function of its input, so page kinds and contents look
/// independent of each other and of the page index.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The kind of page `index`: a third of each, in runs of 1 to 8 pages (real heaps are neither
/// uniform nor perfectly interleaved, and runs let whole zero chunks appear).
pub fn page_kind(index: usize) -> PageKind {
    let run = (index / 8) as u64;
    match mix64(run) % 3 {
        0 => PageKind::Zero,
        1 => PageKind::Text,
        _ => PageKind::Random,
    }
}

const WORDS: [&[u8]; 16] = [
    b"lambda",
    b"snapshot",
    b"restore",
    b"import",
    b"module",
    b"handler",
    b"runtime",
    b"the",
    b"function",
    b"return",
    b"value",
    b"cache",
    b"memory",
    b"page",
    b"init",
    b"json",
];

/// Writes page `index`'s contents into `page` (`PAGE` bytes). Zero pages are left alone: the
/// point of them is that nothing ever touched them.
pub fn fill_page(index: usize, page: &mut [u8]) {
    let seed = mix64(index as u64 ^ 0x7468_6177_0000_0000);
    match page_kind(index) {
        PageKind::Zero => {}
        PageKind::Text => {
            let mut state = seed;
            let mut at = 0;
            while at < page.len() {
                state = mix64(state);
                let word = WORDS[(state % WORDS.len() as u64) as usize];
                for &b in word.iter().chain(b" ") {
                    if at == page.len() {
                        break;
                    }
                    page[at] = b;
                    at += 1;
                }
            }
        }
        PageKind::Random => {
            let mut state = seed;
            for word in page.chunks_exact_mut(8) {
                state = mix64(state);
                word.copy_from_slice(&state.to_le_bytes());
            }
        }
    }
}

/// Fills `buf` (a whole number of pages) page by page; returns the mix.
pub fn fill(buf: &mut [u8]) -> Mix {
    let mut mix = Mix::default();
    for (index, page) in buf.chunks_exact_mut(PAGE).enumerate() {
        fill_page(index, page);
        match page_kind(index) {
            PageKind::Zero => mix.zero += 1,
            PageKind::Text => mix.text += 1,
            PageKind::Random => mix.random += 1,
        }
    }
    mix
}

/// A checksum of `buf` that depends on every byte and its position (FNV-1a over 64-bit words,
/// with the word index mixed in so swapped pages change it).
pub fn checksum(buf: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(buf);
    sum.value()
}

/// [`checksum`] of data that arrives in pieces (a disk read a request at a time): the same value
/// as over all of it at once, provided every piece but the last is whole 64-bit words.
#[derive(Clone, Copy, Debug)]
pub struct Checksum {
    h: u64,
    words: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// The checksum of nothing yet.
    pub const fn new() -> Self {
        Checksum {
            h: 0xcbf2_9ce4_8422_2325,
            words: 0,
        }
    }

    /// Adds `data`'s whole 64-bit words (a trailing partial word is ignored, as by `checksum`).
    pub fn update(&mut self, data: &[u8]) {
        for word in data.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            self.h ^= u64::from_le_bytes(w) ^ self.words.rotate_left(32);
            self.h = self.h.wrapping_mul(0x0000_0100_0000_01b3);
            self.words += 1;
        }
    }

    /// The checksum so far.
    pub fn value(&self) -> u64 {
        self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_third_of_each_kind_in_runs() {
        let mut buf = vec![0u8; 3000 * PAGE];
        let mix = fill(&mut buf);
        assert_eq!(mix.zero + mix.text + mix.random, 3000);
        for n in [mix.zero, mix.text, mix.random] {
            assert!((800..1200).contains(&n), "{mix:?}");
        }
        for (i, page) in buf.chunks_exact(PAGE).enumerate() {
            let zero = page.iter().all(|b| *b == 0);
            assert_eq!(zero, page_kind(i) == PageKind::Zero, "page {i}");
            if page_kind(i) == PageKind::Text {
                assert!(page.iter().all(|b| b.is_ascii_lowercase() || *b == b' '));
            }
        }
    }

    #[test]
    fn same_index_same_contents_and_checksum_sees_every_change() {
        let mut a = vec![0u8; 64 * PAGE];
        let mut b = vec![0u8; 64 * PAGE];
        fill(&mut a);
        fill(&mut b);
        assert_eq!(checksum(&a), checksum(&b));
        b[5 * PAGE + 17] ^= 1;
        assert_ne!(checksum(&a), checksum(&b));
        // Swapping two pages changes it too.
        let mut c = a.clone();
        let (first, rest) = c.split_at_mut(PAGE);
        first.swap_with_slice(&mut rest[..PAGE]);
        if a[..PAGE] != a[PAGE..2 * PAGE] {
            assert_ne!(checksum(&a), checksum(&c));
        }
    }

    #[test]
    fn checksum_in_pieces_is_the_checksum_of_the_whole() {
        let mut a = vec![0u8; 16 * PAGE];
        fill(&mut a);
        let mut sum = Checksum::new();
        for piece in a.chunks(3 * 512) {
            sum.update(piece);
        }
        assert_eq!(sum.value(), checksum(&a));
        assert_eq!(Checksum::default().value(), checksum(&[]));
    }
}
