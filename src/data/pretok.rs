//! Token counting for the two built-in tiktoken encodings without a regex
//! engine.
//!
//! tiktoken splits a text into pieces with one large Unicode regex per
//! encoding, then byte-pair-merges each piece. Most of its time goes to the
//! regex (a backtracking engine). Here the split is a hand-written scanner
//! that follows each pattern's alternatives in order, with the same
//! leftmost-first priorities, so it yields exactly the regex's pieces. The
//! character classes (`\p{L}`, `\s`, …) come from `regex-syntax`, the tables
//! the regex engine itself uses. Tests check the pieces against the regex and
//! the counts against `tiktoken_rs` on random text.
//!
//! The merge step keeps tiktoken's rule: repeatedly merge the adjacent pair
//! whose bytes have the lowest rank (leftmost on ties). A piece that is a
//! token is counted with one lookup; other pieces are merged once per thread
//! and remembered.

use rustc_hash::FxHashMap;
use std::sync::OnceLock;

/// Which split pattern: cl100k_base's or o200k_base's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Cl100k,
    O200k,
}

impl Pattern {
    pub fn of(encoding: &str) -> Option<Pattern> {
        match encoding {
            "cl100k_base" => Some(Pattern::Cl100k),
            "o200k_base" => Some(Pattern::O200k),
            _ => None,
        }
    }
}

const LET: u8 = 1; // \p{L}
const UP: u8 = 2; // [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
const LOW: u8 = 4; // [\p{Ll}\p{Lm}\p{Lo}\p{M}]
const NUM: u8 = 8; // \p{N}
const WS: u8 = 16; // \s
const S_FOLD: u8 = 32; // (?i:s)
const T_FOLD: u8 = 64; // (?i:t)
const OTHER_FOLD: u8 = 128; // (?i:[dm])

/// Character classes, looked up by code point: a byte of flags per BMP code
/// point, sorted ranges above it.
struct Classes {
    bmp: Box<[u8]>,
    astral: Vec<(u32, u32, u8)>,
}

fn ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::parse(pattern).expect("class pattern");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(lit) => {
            let ch = std::str::from_utf8(&lit.0)
                .ok()
                .and_then(|s| s.chars().next())
                .expect("literal class");
            vec![(ch as u32, ch as u32)]
        }
        other => panic!("`{pattern}` is not a class: {other:?}"),
    }
}

fn classes() -> &'static Classes {
    static C: OnceLock<Classes> = OnceLock::new();
    C.get_or_init(|| {
        let sets = [
            (LET, r"\p{L}"),
            (UP, r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"),
            (LOW, r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"),
            (NUM, r"\p{N}"),
            (WS, r"\s"),
            (S_FOLD, r"(?i:[s])"),
            (T_FOLD, r"(?i:[t])"),
            (OTHER_FOLD, r"(?i:[dm])"),
        ];
        let mut bmp = vec![0u8; 0x10000].into_boxed_slice();
        let mut astral: Vec<(u32, u32, u8)> = Vec::new();
        for (bit, pat) in sets {
            for (lo, hi) in ranges(pat) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] |= bit;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x10000), hi, bit));
                }
            }
        }
        // Split the astral ranges into disjoint pieces with merged flags.
        let mut cuts: Vec<u32> = astral
            .iter()
            .flat_map(|&(lo, hi, _)| [lo, hi + 1])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut flat = Vec::new();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let bits = astral
                .iter()
                .filter(|&&(a, b, _)| a <= lo && hi <= b)
                .fold(0u8, |acc, &(_, _, bit)| acc | bit);
            if bits != 0 {
                flat.push((lo, hi, bits));
            }
        }
        Classes { bmp, astral: flat }
    })
}

impl Classes {
    #[inline]
    fn of(&self, cp: u32) -> u8 {
        if cp < 0x10000 {
            self.bmp[cp as usize]
        } else {
            match self.astral.binary_search_by(|&(lo, hi, _)| {
                if hi < cp {
                    std::cmp::Ordering::Less
                } else if lo > cp {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            }) {
                Ok(k) => self.astral[k].2,
                Err(_) => 0,
            }
        }
    }
}

/// The code point at byte `i` of valid UTF-8 and its length in bytes.
#[inline]
fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let x = b[i] as u32;
    if x < 0x80 {
        (x, 1)
    } else if x < 0xE0 {
        (((x & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if x < 0xF0 {
        (
            ((x & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((x & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

/// A scan over one text.
struct Scan<'a> {
    b: &'a [u8],
    c: &'static Classes,
}

impl Scan<'_> {
    /// Flags, code point and length of the character at `i` (all 0 at the end).
    #[inline]
    fn at(&self, i: usize) -> (u8, u32, usize) {
        if i >= self.b.len() {
            return (0, 0, 0);
        }
        let (cp, l) = decode(self.b, i);
        (self.c.of(cp), cp, l)
    }

    /// The end of the run of characters from `i` whose flags meet `want`.
    #[inline]
    fn run(&self, mut i: usize, want: u8) -> usize {
        loop {
            let (f, _, l) = self.at(i);
            if l == 0 || f & want == 0 {
                return i;
            }
            i += l;
        }
    }

    /// The end of the run from `i` of characters that are neither
    /// whitespace, letters nor numbers (`[^\s\p{L}\p{N}]`).
    #[inline]
    fn run_other(&self, mut i: usize) -> usize {
        loop {
            let (f, _, l) = self.at(i);
            if l == 0 || f & (WS | LET | NUM) != 0 {
                return i;
            }
            i += l;
        }
    }

    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`: the end of the contraction.
    #[inline]
    fn contraction(&self, i: usize) -> Option<usize> {
        if self.b.get(i) != Some(&b'\'') {
            return None;
        }
        let (f, cp, l) = self.at(i + 1);
        if l == 0 {
            return None;
        }
        if f & (S_FOLD | T_FOLD | OTHER_FOLD) != 0 {
            return Some(i + 1 + l);
        }
        let second = |want: u8| {
            self.b
                .get(i + 2)
                .is_some_and(|&x| x.eq_ignore_ascii_case(&want))
        };
        let ok = match cp {
            0x6C | 0x4C => second(b'l'),
            0x76 | 0x56 | 0x72 | 0x52 => second(b'e'),
            _ => false,
        };
        ok.then_some(i + 3)
    }

    /// Whitespace from `i` (a whitespace character of length `l`), by the
    /// patterns' common tail: `\s++$` (cl100k_base only: a run that ends
    /// the text), `\s*[\r\n]` (to just past the last line break of the
    /// run), `\s+(?!\S)` (the run, less its last character unless it
    /// reaches the end), then one character.
    #[inline]
    fn space(&self, i: usize, l: usize, end_first: bool) -> usize {
        let e = self.run(i, WS);
        if end_first && e == self.b.len() {
            return e;
        }
        // UTF-8 continuation bytes are never \r or \n.
        if let Some(p) = self.b[i..e].iter().rposition(|&x| x == b'\r' || x == b'\n') {
            return i + p + 1;
        }
        if e == self.b.len() {
            return e;
        }
        let mut last = e - 1;
        while self.b[last] & 0xC0 == 0x80 {
            last -= 1;
        }
        if last > i {
            last
        } else {
            i + l
        }
    }

    /// ` ?[^\s\p{L}\p{N}]+` then any run of the bytes in `tail` (both
    /// patterns' symbol alternative; `cp` is the code point at `i`).
    #[inline]
    fn symbols(&self, i: usize, cp: u32, tail: &[u8]) -> Option<usize> {
        let j = if cp == ' ' as u32 { i + 1 } else { i };
        let (g, _, m) = self.at(j);
        if m == 0 || g & (WS | LET | NUM) != 0 {
            return None;
        }
        let mut e = self.run_other(j);
        while self.b.get(e).is_some_and(|x| tail.contains(x)) {
            e += 1;
        }
        Some(e)
    }

    /// `\p{N}{1,3}` from `i`.
    #[inline]
    fn digits(&self, mut i: usize) -> usize {
        for _ in 0..3 {
            let (f, _, l) = self.at(i);
            if l == 0 || f & NUM == 0 {
                break;
            }
            i += l;
        }
        i
    }

    /// The end of cl100k_base's piece starting at `i`:
    /// `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|
    /// ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`
    fn cl100k(&self, i: usize) -> usize {
        let (f, cp, l) = self.at(i);
        if cp == '\'' as u32 {
            if let Some(e) = self.contraction(i) {
                return e;
            }
        }
        let j = if f & (LET | NUM) == 0 && cp != 0x0D && cp != 0x0A {
            i + l
        } else {
            i
        };
        if self.at(j).0 & LET != 0 {
            return self.run(j, LET);
        }
        if f & NUM != 0 {
            return self.digits(i);
        }
        if let Some(e) = self.symbols(i, cp, b"\r\n") {
            return e;
        }
        self.space(i, l, true)
    }

    /// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+` then an
    /// optional contraction, from `s` (o200k_base's first alternative).
    fn o200k_lower(&self, s: usize) -> Option<usize> {
        let mut k = s;
        let mut last_low = None;
        loop {
            let (f, _, l) = self.at(k);
            if l == 0 || f & UP == 0 {
                break;
            }
            if f & LOW != 0 {
                last_low = Some(k);
            }
            k += l;
        }
        // The upper run gives back characters until a lower one can start.
        let k = if self.at(k).0 & LOW != 0 {
            k
        } else {
            last_low?
        };
        let e = self.run(k, LOW);
        Some(self.contraction(e).unwrap_or(e))
    }

    /// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*` then an
    /// optional contraction, from `s` (o200k_base's second alternative).
    fn o200k_upper(&self, s: usize) -> Option<usize> {
        if self.at(s).0 & UP == 0 {
            return None;
        }
        let e = self.run(self.run(s, UP), LOW);
        Some(self.contraction(e).unwrap_or(e))
    }

    /// The end of o200k_base's piece starting at `i` (`O200K_BASE_PAT_STR`):
    /// two letter-run alternatives each with an optional leading
    /// `[^\r\n\p{L}\p{N}]`, `\p{N}{1,3}`, ` ?[^\s\p{L}\p{N}]+[\r\n/]*`,
    /// `\s*[\r\n]+`, `\s+(?!\S)`, `\s+`.
    fn o200k(&self, i: usize) -> usize {
        let (f, cp, l) = self.at(i);
        let prefixed = f & (LET | NUM) == 0 && cp != 0x0D && cp != 0x0A;
        // Each alternative tries with the optional leading character first.
        for alt in [Self::o200k_lower, Self::o200k_upper] {
            if prefixed {
                if let Some(e) = alt(self, i + l) {
                    return e;
                }
            }
            if let Some(e) = alt(self, i) {
                return e;
            }
        }
        if f & NUM != 0 {
            return self.digits(i);
        }
        if let Some(e) = self.symbols(i, cp, b"\r\n/") {
            return e;
        }
        self.space(i, l, false)
    }
}

/// Calls `f` with each piece of `text` under `pattern`, in order.
pub fn pieces(pattern: Pattern, text: &str, mut f: impl FnMut(&str)) {
    let s = Scan {
        b: text.as_bytes(),
        c: classes(),
    };
    let mut i = 0;
    while i < s.b.len() {
        let e = match pattern {
            Pattern::Cl100k => s.cl100k(i),
            Pattern::O200k => s.o200k(i),
        };
        debug_assert!(e > i, "empty piece at {i}");
        f(&text[i..e]);
        i = e;
    }
}

/// Token ranks of an encoding: byte sequence to rank.
pub type Ranks = FxHashMap<&'static [u8], u32>;

/// How many tokens byte-pair merging makes of `piece`: repeatedly merge the
/// adjacent pair with the lowest rank, leftmost first, until no pair is a
/// token.
pub fn merge_count(ranks: &Ranks, piece: &[u8]) -> usize {
    let rank = |a: usize, b: usize| ranks.get(&piece[a..b]).copied().unwrap_or(u32::MAX);
    let n = piece.len();
    if n <= 1 {
        return n;
    }
    if n < 64 {
        // Part starts and the rank of each part merged with the next.
        let mut starts: Vec<usize> = (0..=n).collect();
        let mut pair: Vec<u32> = (0..n - 1).map(|i| rank(i, i + 2)).collect();
        pair.push(u32::MAX);
        loop {
            let (mut best, mut at) = (u32::MAX, usize::MAX);
            for (k, &r) in pair.iter().enumerate() {
                if r < best {
                    (best, at) = (r, k);
                }
            }
            if best == u32::MAX {
                return starts.len() - 1;
            }
            starts.remove(at + 1);
            pair.remove(at + 1);
            let parts = starts.len() - 1;
            pair[at] = if at + 2 <= parts {
                rank(starts[at], starts[at + 2])
            } else {
                u32::MAX
            };
            if at > 0 {
                pair[at - 1] = rank(starts[at - 1], starts[at + 1]);
            }
        }
    }
    // Long pieces: a linked list of parts and a heap of candidate merges.
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut next: Vec<usize> = (1..=n).collect(); // next part's start (n = none)
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut alive = vec![true; n];
    let mut pr: Vec<u32> = (0..n)
        .map(|i| if i + 2 <= n { rank(i, i + 2) } else { u32::MAX })
        .collect();
    let mut heap: BinaryHeap<Reverse<(u32, usize)>> = pr
        .iter()
        .enumerate()
        .filter(|(_, &r)| r != u32::MAX)
        .map(|(i, &r)| Reverse((r, i)))
        .collect();
    let mut parts = n;
    let end_of = |next: &Vec<usize>, j: usize| if j < n { next[j] } else { n };
    while let Some(Reverse((r, i))) = heap.pop() {
        if !alive[i] || pr[i] != r {
            continue;
        }
        // Merge part i with the next one.
        let j = next[i];
        alive[j] = false;
        next[i] = next[j];
        if next[i] < n {
            prev[next[i]] = i;
        }
        parts -= 1;
        pr[i] = if next[i] < n {
            rank(i, end_of(&next, next[i]))
        } else {
            u32::MAX
        };
        if pr[i] != u32::MAX {
            heap.push(Reverse((pr[i], i)));
        }
        let p = prev[i];
        if p != usize::MAX {
            pr[p] = rank(p, next[i]);
            if pr[p] != u32::MAX {
                heap.push(Reverse((pr[p], p)));
            }
        }
    }
    parts
}

/// The ranks of a built-in encoding, read out of tiktoken_rs's table once
/// per process.
pub fn ranks_from_tiktoken(bpe: &tiktoken_rs::CoreBPE) -> Ranks {
    // All token bytes in one block, then one map sized up front.
    let mut blob: Vec<u8> = Vec::with_capacity(1 << 21);
    let mut spans: Vec<(usize, usize, u32)> = Vec::with_capacity(1 << 18);
    let mut misses = 0;
    for r in 0u32.. {
        match bpe.decode_bytes(&[r]) {
            Ok(b) => {
                spans.push((blob.len(), b.len(), r));
                blob.extend_from_slice(&b);
                misses = 0;
            }
            // Special tokens sit past the ordinary ones, after a gap.
            Err(_) if misses < 1024 => misses += 1,
            Err(_) => break,
        }
    }
    let blob: &'static [u8] = Box::leak(blob.into_boxed_slice());
    let mut ranks = Ranks::with_capacity_and_hasher(spans.len(), Default::default());
    for (at, len, r) in spans {
        ranks.insert(&blob[at..at + len], r);
    }
    ranks
}

/// Pieces already merged, with their token counts (pieces that are one
/// token are not kept: the rank table answers them).
pub type Memo = FxHashMap<Box<[u8]>, u32>;

/// A token counter for one built-in encoding.
#[derive(Clone, Copy)]
pub struct Counter {
    pub pattern: Pattern,
    pub ranks: &'static Ranks,
}

impl Counter {
    /// The number of tokens `encode_ordinary` gives for `text`.
    pub fn count(&self, text: &str, memo: &mut Memo) -> usize {
        let mut n = 0;
        pieces(self.pattern, text, |p| {
            let p = p.as_bytes();
            n += if self.ranks.contains_key(p) {
                1
            } else if let Some(&k) = memo.get(p) {
                k as usize
            } else {
                let k = merge_count(self.ranks, p);
                memo.insert(p.into(), k as u32);
                k
            };
        });
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    const CL100K: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

    /// Characters that exercise every branch: ASCII of each kind, case-folded
    /// contraction letters (ſ, K), upper/lower/title/modifier/other letters,
    /// combining marks, other numbers, Unicode spaces, astral letters and
    /// symbols.
    const ALPHABET: &[char] = &[
        'a',
        'b',
        's',
        't',
        'd',
        'm',
        'l',
        'v',
        'e',
        'r',
        'S',
        'T',
        'D',
        'M',
        'L',
        'V',
        'E',
        'R',
        'X',
        'ſ',
        'K',
        '\'',
        '\'',
        '\'',
        ' ',
        ' ',
        ' ',
        '\t',
        '\n',
        '\r',
        '\u{b}',
        '\u{c}',
        '0',
        '7',
        '9',
        '½',
        '²',
        'Ⅻ',
        '/',
        '/',
        '.',
        ',',
        '!',
        '-',
        '(',
        '"',
        '#',
        'é',
        'É',
        'ǅ',
        'ʰ',
        'ー',
        '中',
        '\u{301}',
        '\u{20dd}',
        '\u{a0}',
        '\u{2003}',
        '\u{2028}',
        '\u{85}',
        '\u{3000}',
        '𝐀',
        '𝐚',
        '😀',
        '𐍈',
        '\u{1d167}',
        'ß',
        'ﬀ',
        'Ω',
    ];

    fn random_text(rng: &mut SplitMix64, len: usize) -> String {
        (0..len)
            .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
            .collect()
    }

    fn regex_pieces(re: &fancy_regex::Regex, text: &str) -> Vec<String> {
        re.find_iter(text)
            .map(|m| m.expect("regex").as_str().to_string())
            .collect()
    }

    fn our_pieces(p: Pattern, text: &str) -> Vec<String> {
        let mut v = Vec::new();
        pieces(p, text, |s| v.push(s.to_string()));
        v
    }

    #[test]
    fn pieces_match_the_regex_on_random_text() {
        let o200k = tiktoken_rs::O200K_BASE_PAT_STR;
        for (pattern, source) in [(Pattern::Cl100k, CL100K), (Pattern::O200k, o200k)] {
            let re = fancy_regex::Regex::new(source).unwrap();
            let mut rng = SplitMix64::new(7);
            for round in 0..5000 {
                let text = random_text(&mut rng, 1 + round % 97);
                assert_eq!(
                    our_pieces(pattern, &text),
                    regex_pieces(&re, &text),
                    "{pattern:?} on {text:?}"
                );
            }
        }
    }

    #[test]
    fn counts_match_tiktoken_on_random_text_and_long_pieces() {
        for name in ["cl100k_base", "o200k_base"] {
            let bpe = crate::data::tokenize::encoding(name).unwrap();
            let ranks: &'static Ranks = Box::leak(Box::new(ranks_from_tiktoken(bpe)));
            let counter = Counter {
                pattern: Pattern::of(name).unwrap(),
                ranks,
            };
            let mut memo = Memo::default();
            let mut rng = SplitMix64::new(11);
            let mut texts: Vec<String> = (0..300)
                .map(|k| random_text(&mut rng, 1 + k % 200))
                .collect();
            // Long pieces take the heap merge: letters, digits-free runs of
            // symbols, repeated pairs (ties), and a base64-like blob.
            let letters: String = (0..700)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect();
            texts.push(letters.clone());
            texts.push(format!(" {letters}'s"));
            texts.push("ab".repeat(300));
            texts.push("=-".repeat(150) + "\n\n");
            texts.push("é".repeat(90));
            for t in &texts {
                assert_eq!(
                    counter.count(t, &mut memo),
                    bpe.encode_ordinary(t).len(),
                    "{name} on {t:?}"
                );
            }
            // Counting again from the memo gives the same.
            let again: usize = texts.iter().map(|t| counter.count(t, &mut memo)).sum();
            let fresh: usize = texts.iter().map(|t| bpe.encode_ordinary(t).len()).sum();
            assert_eq!(again, fresh);
        }
    }

    #[test]
    fn pieces_of_prose_match_the_regex() {
        let text =
            "He said: \"I'll see you at 10:30, won't you?\"\n\n  Les élèves d'aujourd'HUI'S \
                    ÉTÉS — 12345 items/s, 3.14%!\r\n\tcafé\u{301} naïve 東京タワー 😀😀 end  \n";
        let o200k = tiktoken_rs::O200K_BASE_PAT_STR;
        for (pattern, source) in [(Pattern::Cl100k, CL100K), (Pattern::O200k, o200k)] {
            let re = fancy_regex::Regex::new(source).unwrap();
            assert_eq!(our_pieces(pattern, text), regex_pieces(&re, text));
        }
        // The split itself, for a reader of this test.
        assert_eq!(
            our_pieces(Pattern::Cl100k, "I'll go  now\n"),
            ["I", "'ll", " go", " ", " now", "\n"]
        );
    }
}
