//! The KV cache, per layer: a read-only *base* that many caches may share
//! (a prefill's, or a cell's kept entries) and an owned *tail*, a
//! preallocated `(G, cap, D)` buffer written in place. See
//! `docs/ARCHITECTURE.md` ("The KV cache") for who owns what.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Device, Layout, Storage, StorageRef, Tensor};

use super::quant::KvQuant;

/// One layer's keys (after RoPE) and values, `G` KV heads of `D` values each;
/// every head holds the same number of entries.
pub struct LayerKv {
    g: usize,
    d: usize,
    /// `(G, n, D)` keys and values, contiguous, never written.
    base: Option<(Tensor, Tensor)>,
    base_len: usize,
    /// `(G, cap, D)` keys and values; rows `0..own` of each head hold entries.
    tail: Option<(Tensor, Tensor)>,
    cap: usize,
    own: usize,
    dev: Device,
}

impl LayerKv {
    /// An empty layer with room for `cap` entries a head.
    pub fn new(g: usize, d: usize, cap: usize, dev: &Device) -> Result<LayerKv> {
        let mut l = LayerKv {
            g,
            d,
            base: None,
            base_len: 0,
            tail: None,
            cap: 0,
            own: 0,
            dev: dev.clone(),
        };
        l.reserve(cap)?;
        Ok(l)
    }

    /// Entries a head.
    pub fn len(&self) -> usize {
        self.base_len + self.own
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries a head the layer holds without growing.
    pub fn capacity(&self) -> usize {
        self.base_len + self.cap
    }

    /// Bytes of storage held (shared base included), keys and values.
    pub fn bytes(&self) -> usize {
        2 * self.capacity() * self.g * self.d * 4
    }

    /// Room for `extra` more entries a head in the tail. Grows by at least
    /// doubling, so appends are amortised O(1) a row.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.own + extra;
        if need <= self.cap {
            return Ok(());
        }
        let cap = need.max(2 * self.cap);
        let k = Tensor::zeros((self.g, cap, self.d), DType::F32, &self.dev)?;
        let v = Tensor::zeros((self.g, cap, self.d), DType::F32, &self.dev)?;
        if let Some((ok, ov)) = &self.tail {
            if self.own > 0 {
                k.slice_set(&ok.narrow(1, 0, self.own)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, self.own)?.contiguous()?, 1, 0)?;
            }
        }
        self.tail = Some((k, v));
        self.cap = cap;
        Ok(())
    }

    /// Writes `(G, T, D)` keys and values after the last entry, in place.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(1)?;
        if k.dims() != [self.g, t, self.d] || v.dims() != k.dims() {
            bail!(
                "KV rows of shape {:?}/{:?} do not fit a cache of {} heads × {}",
                k.dims(),
                v.dims(),
                self.g,
                self.d
            );
        }
        self.reserve(t)?;
        let (tk, tv) = self.tail.as_ref().expect("reserved");
        tk.slice_set(&k.contiguous()?, 1, self.own)?;
        tv.slice_set(&v.contiguous()?, 1, self.own)?;
        self.own += t;
        Ok(())
    }

    /// The parts attention reads, entries `from..len` in position order:
    /// `(G, n, D)` views.
    fn parts(&self, from: usize) -> Result<Vec<(Tensor, Tensor)>> {
        let mut parts = Vec::with_capacity(2);
        if let (Some((k, v)), true) = (&self.base, from < self.base_len) {
            let n = self.base_len - from;
            parts.push((k.narrow(1, from, n)?, v.narrow(1, from, n)?));
        }
        let start = from.saturating_sub(self.base_len);
        if let (Some((k, v)), true) = (&self.tail, start < self.own) {
            let n = self.own - start;
            parts.push((k.narrow(1, start, n)?, v.narrow(1, start, n)?));
        }
        Ok(parts)
    }

    /// `q · Kᵀ` for `(G, M, D)` queries over entries `from..len`:
    /// `(G, M, len − from)`, without copying keys. A sliding-window layer
    /// reads only the entries its queries can see.
    pub fn scores(&self, q: &Tensor, from: usize) -> Result<Tensor> {
        let parts = self.parts(from)?;
        let mut s = parts
            .iter()
            .map(|(k, _)| Ok(q.matmul(&k.t()?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(match s.len() {
            0 => bail!("attention over an empty KV cache"),
            1 => s.pop().expect("one part"),
            _ => Tensor::cat(&s, 2)?,
        })
    }

    /// `p · V` for `(G, M, len − from)` weights over entries `from..len`:
    /// `(G, M, D)`.
    pub fn weighted(&self, p: &Tensor, from: usize) -> Result<Tensor> {
        let parts = self.parts(from)?;
        let mut at = 0;
        let mut out: Option<Tensor> = None;
        for (_, v) in &parts {
            let n = v.dim(1)?;
            let w = if parts.len() == 1 {
                p.clone()
            } else {
                p.narrow(2, at, n)?
            };
            let y = w.matmul(v)?;
            out = Some(match out {
                None => y,
                Some(o) => (o + y)?,
            });
            at += n;
        }
        match out {
            Some(o) => Ok(o),
            None => bail!("attention over an empty KV cache"),
        }
    }

    /// Makes every entry part of the read-only base (the tail is emptied).
    /// Free when the tail is exactly full and there is no base yet.
    pub fn freeze(&mut self) -> Result<()> {
        if self.own == 0 {
            self.tail = None;
            self.cap = 0;
            return Ok(());
        }
        let (tk, tv) = self.tail.take().expect("entries live in the tail");
        let (k, v) = (
            tk.narrow(1, 0, self.own)?.contiguous()?,
            tv.narrow(1, 0, self.own)?.contiguous()?,
        );
        self.base = Some(match self.base.take() {
            None => (k, v),
            Some((bk, bv)) => (Tensor::cat(&[bk, k], 1)?, Tensor::cat(&[bv, v], 1)?),
        });
        self.base_len += self.own;
        self.own = 0;
        self.cap = 0;
        Ok(())
    }

    /// Rows `kept[h]` of each head `h`, `[G][n][D]` (keys, values).
    pub fn rows(&self, kept: &[Vec<usize>]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.check_kept(kept)?;
        let d = self.d;
        let mut out = (
            Vec::with_capacity(self.g * n * d),
            Vec::with_capacity(self.g * n * d),
        );
        let (bk, bv) = (
            hold(self.base.as_ref().map(|b| &b.0)),
            hold(self.base.as_ref().map(|b| &b.1)),
        );
        let (tk, tv) = (
            hold(self.tail.as_ref().map(|t| &t.0)),
            hold(self.tail.as_ref().map(|t| &t.1)),
        );
        let (bk, bv, tk, tv) = (f32s(&bk)?, f32s(&bv)?, f32s(&tk)?, f32s(&tv)?);
        for (h, pos) in kept.iter().enumerate() {
            for &p in pos {
                let (k, v, at) = if p < self.base_len {
                    (bk, bv, (h * self.base_len + p) * d)
                } else {
                    (tk, tv, (h * self.cap + p - self.base_len) * d)
                };
                out.0.extend_from_slice(&k[at..at + d]);
                out.1.extend_from_slice(&v[at..at + d]);
            }
        }
        Ok(out)
    }

    /// Every entry, `[G][len][D]` (keys, values).
    pub fn to_rows(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        self.rows(&vec![(0..self.len()).collect(); self.g])
    }

    /// Keeps rows `kept[h]` of each head (ascending, the same count per
    /// head), quantised as `quant` says. With no shared base the tail is
    /// compacted in place; otherwise the kept rows go to a new tail with
    /// room for `room` more entries, and the base is let go.
    pub fn evict(&mut self, kept: &[Vec<usize>], quant: KvQuant, room: usize) -> Result<()> {
        let n = self.check_kept(kept)?;
        let (mut k, mut v) = self.rows(kept)?;
        quant.round_trip_rows(&mut k, self.d);
        quant.round_trip_rows(&mut v, self.d);
        let k = Tensor::from_vec(k, (self.g, n, self.d), &self.dev)?;
        let v = Tensor::from_vec(v, (self.g, n, self.d), &self.dev)?;
        match &self.tail {
            Some((tk, tv)) if self.base.is_none() && n <= self.cap => {
                tk.slice_set(&k, 1, 0)?;
                tv.slice_set(&v, 1, 0)?;
            }
            _ => {
                self.base = None;
                self.base_len = 0;
                self.tail = None;
                self.cap = 0;
                self.own = 0;
                self.reserve(n + room)?;
                let (tk, tv) = self.tail.as_ref().expect("reserved");
                tk.slice_set(&k, 1, 0)?;
                tv.slice_set(&v, 1, 0)?;
            }
        }
        self.own = n;
        Ok(())
    }

    /// Calls `f` with the keys `[G][rows][D]` of a frozen layer and `rows`,
    /// the entries a head, borrowed from the base without a copy.
    pub fn with_keys<R>(&self, f: impl FnOnce(&[f32], usize) -> R) -> Result<R> {
        match (&self.base, self.own) {
            (Some((k, _)), 0) => {
                let held = Some(k.storage_and_layout());
                Ok(f(f32s(&held)?, self.base_len))
            }
            _ => bail!("the keys of a layer are read only once it is frozen"),
        }
    }

    /// Whether `other` reads the same base storage (no copy was made).
    pub fn shares_base_with(&self, other: &LayerKv) -> bool {
        match (&self.base, &other.base) {
            (Some((a, _)), Some((b, _))) => {
                let (sa, _) = a.storage_and_layout();
                let (sb, _) = b.storage_and_layout();
                std::ptr::eq(&*sa, &*sb)
            }
            _ => false,
        }
    }

    fn check_kept(&self, kept: &[Vec<usize>]) -> Result<usize> {
        if kept.len() != self.g {
            bail!(
                "kept positions for {} heads, the cache has {}",
                kept.len(),
                self.g
            );
        }
        let n = kept[0].len();
        for pos in kept {
            if pos.len() != n {
                bail!("policy kept unequal counts across KV heads");
            }
            if pos.windows(2).any(|w| w[0] >= w[1]) || pos.last().is_some_and(|&p| p >= self.len())
            {
                bail!("kept positions must ascend and lie below {}", self.len());
            }
        }
        Ok(n)
    }
}

/// A copy that shares the base and copies the tail: what a teacher-forced
/// pass appends to never reaches the original.
impl Clone for LayerKv {
    fn clone(&self) -> LayerKv {
        let tail = match (&self.tail, self.own) {
            (Some((k, v)), n) if n > 0 => {
                let c = |t: &Tensor| t.narrow(1, 0, n).and_then(|t| t.copy());
                match (c(k), c(v)) {
                    (Ok(k), Ok(v)) => Some((k, v)),
                    (Err(e), _) | (_, Err(e)) => panic!("copying a KV tail: {e}"),
                }
            }
            _ => None,
        };
        LayerKv {
            g: self.g,
            d: self.d,
            base: self.base.clone(),
            base_len: self.base_len,
            cap: if tail.is_some() { self.own } else { 0 },
            tail,
            own: self.own,
            dev: self.dev.clone(),
        }
    }
}

/// A tensor's storage, read-locked, with its layout.
fn hold(t: Option<&Tensor>) -> Option<(StorageRef<'_>, &Layout)> {
    t.map(Tensor::storage_and_layout)
}

/// A contiguous f32 CPU tensor's values (an empty slice for `None`).
fn f32s<'a>(held: &'a Option<(StorageRef<'_>, &Layout)>) -> Result<&'a [f32]> {
    let Some((st, layout)) = held else {
        return Ok(&[]);
    };
    match &**st {
        Storage::Cpu(CpuStorage::F32(v)) if layout.is_contiguous() => {
            Ok(&v[layout.start_offset()..][..layout.shape().elem_count()])
        }
        _ => bail!("the KV cache holds contiguous f32 tensors on the CPU"),
    }
}

/// A whole cache, one entry per layer.
#[derive(Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Quantisation applied to every entry written from now on.
    pub quant: KvQuant,
}

impl KvCache {
    pub fn new(
        n_layer: usize,
        g: usize,
        d: usize,
        cap: usize,
        quant: KvQuant,
        dev: &Device,
    ) -> Result<KvCache> {
        Ok(KvCache {
            layers: (0..n_layer)
                .map(|_| LayerKv::new(g, d, cap, dev))
                .collect::<Result<_>>()?,
            quant,
        })
    }

    pub fn freeze(&mut self) -> Result<()> {
        self.layers.iter_mut().try_for_each(LayerKv::freeze)
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: usize = 2;
    const D: usize = 4;

    /// `(G, t, D)` rows whose every value names (head, position, column).
    fn rows(from: usize, t: usize) -> Tensor {
        let x: Vec<f32> = (0..G)
            .flat_map(|h| {
                (from..from + t)
                    .flat_map(move |p| (0..D).map(move |c| (h * 1000 + p * 10 + c) as f32))
            })
            .collect();
        Tensor::from_vec(x, (G, t, D), &Device::Cpu).unwrap()
    }

    /// The largest |a − b| over two tensors of one shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn positions(l: &LayerKv) -> Vec<Vec<usize>> {
        let (k, v) = l.to_rows().unwrap();
        assert_eq!(k, v);
        k.chunks(l.len() * D)
            .map(|head| {
                head.chunks(D)
                    .map(|r| (r[0] as usize % 1000) / 10)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn append_writes_in_place_and_grows_by_doubling() {
        let mut l = LayerKv::new(G, D, 4, &Device::Cpu).unwrap();
        l.append(&rows(0, 3), &rows(0, 3)).unwrap();
        assert_eq!((l.len(), l.capacity()), (3, 4));
        l.append(&rows(3, 1), &rows(3, 1)).unwrap();
        assert_eq!(l.capacity(), 4, "a fitting append does not grow");
        l.append(&rows(4, 1), &rows(4, 1)).unwrap();
        assert_eq!(l.capacity(), 8, "a full tail doubles");
        assert_eq!(positions(&l), vec![(0..5).collect::<Vec<_>>(); G]);
        // Head 1's rows are head 1's (value 1000 + …), not head 0's.
        let (k, _) = l.to_rows().unwrap();
        assert_eq!(k[5 * D], 1000.0);
        assert!(l
            .append(&rows(0, 1).narrow(2, 0, 2).unwrap(), &rows(0, 1))
            .is_err());
    }

    #[test]
    fn evict_compacts_the_tail_in_place_and_appending_continues_after_it() {
        let mut l = LayerKv::new(G, D, 8, &Device::Cpu).unwrap();
        l.append(&rows(0, 6), &rows(0, 6)).unwrap();
        l.evict(&[vec![0, 2, 5], vec![1, 3, 4]], KvQuant::F16, 0)
            .unwrap();
        assert_eq!(l.capacity(), 8, "compaction keeps the buffer");
        assert_eq!(positions(&l), vec![vec![0, 2, 5], vec![1, 3, 4]]);
        l.append(&rows(6, 1), &rows(6, 1)).unwrap();
        assert_eq!(positions(&l), vec![vec![0, 2, 5, 6], vec![1, 3, 4, 6]]);
        assert!(l.evict(&[vec![0, 1], vec![0]], KvQuant::F16, 0).is_err());
        assert!(l.evict(&[vec![1, 0], vec![0, 1]], KvQuant::F16, 0).is_err());
        assert!(l.evict(&[vec![0, 9], vec![0, 1]], KvQuant::F16, 0).is_err());
    }

    #[test]
    fn a_frozen_base_is_shared_by_clones_and_never_written() {
        let mut prefill = LayerKv::new(G, D, 5, &Device::Cpu).unwrap();
        prefill.append(&rows(0, 5), &rows(0, 5)).unwrap();
        prefill.freeze().unwrap();
        let mut cell = prefill.clone();
        assert!(
            cell.shares_base_with(&prefill),
            "an exact cell copies nothing"
        );
        cell.append(&rows(5, 2), &rows(5, 2)).unwrap();
        let mut fork = cell.clone();
        fork.append(&rows(7, 1), &rows(7, 1)).unwrap();
        assert_eq!(positions(&prefill), vec![(0..5).collect::<Vec<_>>(); G]);
        assert_eq!(positions(&cell), vec![(0..7).collect::<Vec<_>>(); G]);
        assert_eq!(positions(&fork), vec![(0..8).collect::<Vec<_>>(); G]);
        // Evicting across base and tail gathers into a new buffer; the
        // prefill's base is untouched.
        cell.evict(&[vec![1, 4, 6], vec![0, 5, 6]], KvQuant::F16, 2)
            .unwrap();
        assert_eq!(cell.capacity(), 5, "kept rows and the room asked for");
        assert!(!cell.shares_base_with(&prefill));
        assert_eq!(positions(&cell), vec![vec![1, 4, 6], vec![0, 5, 6]]);
        assert_eq!(positions(&prefill), vec![(0..5).collect::<Vec<_>>(); G]);
        let keys = prefill.with_keys(|k, n| (k.len(), n)).unwrap();
        assert_eq!(keys, (G * 5 * D, 5));
        assert!(cell.with_keys(|_, _| ()).is_err(), "a tail is not frozen");
    }

    #[test]
    fn attention_over_base_and_tail_equals_attention_over_one_block() {
        let dev = Device::Cpu;
        let mut split = LayerKv::new(G, D, 2, &dev).unwrap();
        let all = rows(0, 7);
        let vals = ((rows(0, 7) * 0.001).unwrap() - 0.5).unwrap();
        split
            .append(
                &all.narrow(1, 0, 4).unwrap(),
                &vals.narrow(1, 0, 4).unwrap(),
            )
            .unwrap();
        split.freeze().unwrap();
        split
            .append(
                &all.narrow(1, 4, 3).unwrap(),
                &vals.narrow(1, 4, 3).unwrap(),
            )
            .unwrap();
        let mut one = LayerKv::new(G, D, 7, &dev).unwrap();
        one.append(&all, &vals).unwrap();
        // A tail with room to spare is read through a strided view.
        let mut roomy = LayerKv::new(G, D, 16, &dev).unwrap();
        roomy.append(&all, &vals).unwrap();
        let q = ((rows(0, 3) * 0.0001).unwrap() - 0.02).unwrap(); // (G, 3, D)
        let a = split.scores(&q, 0).unwrap();
        let b = one.scores(&q, 0).unwrap();
        assert_eq!(a.dims(), &[G, 3, 7]);
        assert!(max_diff(&a, &b) < 1e-4);
        assert!(max_diff(&roomy.scores(&q, 0).unwrap(), &b) < 1e-4);
        let p = candle_nn::ops::softmax_last_dim(&b).unwrap();
        let y = one.weighted(&p, 0).unwrap();
        assert!(max_diff(&split.weighted(&p, 0).unwrap(), &y) < 1e-5);
        assert!(max_diff(&roomy.weighted(&p, 0).unwrap(), &y) < 1e-5);
    }

    #[test]
    fn attention_from_an_entry_reads_only_the_entries_after_it() {
        let dev = Device::Cpu;
        let mut l = LayerKv::new(G, D, 3, &dev).unwrap();
        let all = ((rows(0, 6) * 0.001).unwrap() - 0.3).unwrap();
        l.append(&all.narrow(1, 0, 3).unwrap(), &all.narrow(1, 0, 3).unwrap())
            .unwrap();
        l.freeze().unwrap();
        l.append(&all.narrow(1, 3, 3).unwrap(), &all.narrow(1, 3, 3).unwrap())
            .unwrap();
        let q = ((rows(0, 2) * 0.002).unwrap() + 0.1).unwrap();
        for from in [0, 2, 3, 5] {
            let tail = all.narrow(1, from, 6 - from).unwrap().contiguous().unwrap();
            let want = q.matmul(&tail.t().unwrap()).unwrap();
            let got = l.scores(&q, from).unwrap();
            assert_eq!(got.dims(), &[G, 2, 6 - from]);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "from {from}: {diff}");
            let p = candle_nn::ops::softmax_last_dim(&want).unwrap();
            let y = p.matmul(&tail).unwrap();
            let diff = max_diff(&l.weighted(&p, from).unwrap(), &y);
            assert!(diff < 1e-5, "from {from}: {diff}");
        }
    }

    #[test]
    fn quantised_eviction_rounds_the_kept_rows() {
        let mut l = LayerKv::new(G, 32, 3, &Device::Cpu).unwrap();
        let x = Tensor::rand(-1f32, 1f32, (G, 3, 32), &Device::Cpu).unwrap();
        l.append(&x, &x).unwrap();
        l.evict(&[vec![0, 1, 2], vec![0, 1, 2]], KvQuant::Q4_0, 0)
            .unwrap();
        let (k, _) = l.to_rows().unwrap();
        let mut want = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for b in want.chunks_mut(32) {
            KvQuant::Q4_0.round_trip(b);
        }
        assert_eq!(k, want);
    }
}
