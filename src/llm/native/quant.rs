//! KV quantisation in llama.cpp's block formats, applied to kept keys and values
//! along the head dimension in blocks of 32: `q8_0` and `q4_0`. The engine keeps
//! the restored values (what a quantised cache would hand to attention) and
//! counts bytes as the format stores them.

use serde::{Deserialize, Serialize};

/// Values per quantisation block.
pub const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KvQuant {
    /// No quantisation: counted as f16, as llama.cpp stores an unquantised cache.
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

impl KvQuant {
    pub fn parse(s: &str) -> Option<KvQuant> {
        match s {
            "f16" => Some(KvQuant::F16),
            "q8_0" => Some(KvQuant::Q8_0),
            "q4_0" => Some(KvQuant::Q4_0),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            KvQuant::F16 => "f16",
            KvQuant::Q8_0 => "q8_0",
            KvQuant::Q4_0 => "q4_0",
        }
    }
    /// Bytes for `n` values (whole blocks; f16 is 2 bytes a value).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            KvQuant::F16 => 2 * n,
            KvQuant::Q8_0 => n.div_ceil(BLOCK) * 34,
            KvQuant::Q4_0 => n.div_ceil(BLOCK) * 18,
        }
    }
    /// Quantises and restores rows of `d` values (a KV entry each); f16, the
    /// unquantised cache, leaves them as they are.
    pub fn round_trip_rows(self, x: &mut [f32], d: usize) {
        if self != KvQuant::F16 {
            x.chunks_mut(d).for_each(|row| self.round_trip(row));
        }
    }

    /// Quantises and restores `x` in place, block by block.
    pub fn round_trip(self, x: &mut [f32]) {
        for block in x.chunks_mut(BLOCK) {
            match self {
                KvQuant::F16 => {
                    for v in block.iter_mut() {
                        *v = half::f16::from_f32(*v).to_f32();
                    }
                }
                KvQuant::Q8_0 => q8_0_block(block),
                KvQuant::Q4_0 => q4_0_block(block),
            }
        }
    }
}

/// `d = max|x| / 127`, `q = round(x / d)`, restored as `q × d` with `d` stored as f16.
fn q8_0_block(x: &mut [f32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let d16 = half::f16::from_f32(d).to_f32();
    for v in x.iter_mut() {
        let q = (*v * id).round().clamp(-128.0, 127.0);
        *v = q * d16;
    }
}

/// The element `m` with the largest |x| (sign kept), `d = m / −8`,
/// `q = min(15, trunc(x / d + 8.5))`, restored as `(q − 8) × d`.
fn q4_0_block(x: &mut [f32]) {
    let mut m = 0f32;
    for &v in x.iter() {
        if v.abs() > m.abs() {
            m = v;
        }
    }
    let d = m / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let d16 = half::f16::from_f32(d).to_f32();
    for v in x.iter_mut() {
        let q = ((*v * id + 8.5) as i32).clamp(0, 15);
        *v = (q - 8) as f32 * d16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_matches_the_block_formula_by_hand() {
        // max |x| = 2.54 → d = 0.02; 1.0 → q = 50 → 1.0; −0.013 → q = −1 (round(−0.65)).
        let mut x = vec![0f32; 32];
        x[0] = 2.54;
        x[1] = 1.0;
        x[2] = -0.013;
        x[3] = 0.0101;
        KvQuant::Q8_0.round_trip(&mut x);
        let d = half::f16::from_f32(0.02).to_f32();
        assert_eq!(x[0], 127.0 * d);
        assert_eq!(x[1], 50.0 * d);
        assert_eq!(x[2], -d);
        assert_eq!(x[3], d);
        assert_eq!(x[4], 0.0);
    }

    #[test]
    fn q4_0_matches_the_block_formula_by_hand() {
        // m = −4 (largest |x|, sign kept) → d = 0.5; x/d + 8.5: −4 → 0.5 → q 0 → −4;
        // 1.2 → 10.9 → q 10 → 1.0; 3.9 → 16.3 → q 15 (capped) → 3.5; 0 → 8.5 → q 8 → 0.
        let mut x = vec![0f32; 32];
        x[0] = -4.0;
        x[1] = 1.2;
        x[2] = 3.9;
        KvQuant::Q4_0.round_trip(&mut x);
        assert_eq!(&x[..4], &[-4.0, 1.0, 3.5, 0.0]);
    }

    #[test]
    fn blocks_are_independent_and_sizes_follow_the_format() {
        let mut x: Vec<f32> = (0..64)
            .map(|i| if i < 32 { 100.0 } else { 0.001 * i as f32 })
            .collect();
        KvQuant::Q8_0.round_trip(&mut x);
        // The second block's small values keep their own scale.
        assert!((x[40] - 0.040).abs() < 0.0005, "{}", x[40]);
        assert_eq!(KvQuant::Q8_0.bytes(64), 68);
        assert_eq!(KvQuant::Q4_0.bytes(64), 36);
        assert_eq!(KvQuant::F16.bytes(64), 128);
    }
}
