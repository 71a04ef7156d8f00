//! A decoder read from a GGUF file — the `llama` architecture (Llama 2/3 with
//! its RoPE frequency factors, SmolLM2), `qwen2` and `qwen3` — with attention written
//! out so the prefill can hand the policies what they score: per layer the keys
//! and values after RoPE, the attention each position received from every
//! prefill query, and the attention rows of the last queries.
//!
//! Shapes in comments: `T` new tokens, `S` cached positions, `H` query heads,
//! `G` KV heads (`H = G × group`), `D` head dim, `E` hidden size.

pub use super::kv::{KvCache, LayerKv};
use super::quant::KvQuant;
use anyhow::{anyhow, bail, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

/// The architectures the engine runs: one code path, these differences
/// (as llama.cpp reads each from the GGUF file).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arch {
    /// RoPE on interleaved pairs (the GGUF converter permutes Q and K for it);
    /// Llama 3 adds per-frequency factors (`rope_freqs.weight`).
    Llama,
    /// Biases on Q, K and V; RoPE on the two halves of each head (NeoX).
    Qwen2,
    /// An RMS norm over each head of Q and K before RoPE (NeoX); the head
    /// size comes from `attention.key_length`.
    Qwen3,
    /// Qwen3's Q/K norms plus: embeddings scaled by √hidden, RMS norms after
    /// attention and after the feed-forward block, GeGLU (tanh GELU), and
    /// sliding-window layers (five local layers with RoPE base 10,000, then
    /// one global layer) as llama.cpp runs them.
    Gemma3,
}

impl Arch {
    pub fn parse(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
    /// Whether RoPE rotates interleaved pairs (else the two halves).
    fn interleaved_rope(self) -> bool {
        self == Arch::Llama
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub eps: f32,
    pub rope_base: f32,
    pub context: usize,
    /// Sliding-window attention: (window, pattern). Layer `l` is local when
    /// `l % pattern < pattern − 1` and sees the last `window` positions.
    pub swa: Option<(usize, usize)>,
    /// What scores are multiplied by before the softmax.
    pub attn_scale: f64,
}

impl Hparams {
    /// The window of layer `l` when it is a sliding-window layer.
    pub fn window_of(&self, l: usize) -> Option<usize> {
        self.swa
            .and_then(|(w, pattern)| (l % pattern < pattern - 1).then_some(w))
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    /// `qwen2`: biases added to Q, K and V.
    bias: Option<[Tensor; 3]>,
    /// `qwen3`, `gemma3`: RMS-norm weights over each head of Q and of K.
    qk_norm: Option<[Tensor; 2]>,
    /// `gemma3`: RMS norms of the attention output and of the feed-forward
    /// output, before each is added to the residual.
    post_norms: Option<[Tensor; 2]>,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

pub struct Llama {
    pub hp: Hparams,
    embed: QTensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    /// Sliding-window layers' own RoPE tables (`gemma3`: base 10,000).
    local_rope: Option<(Tensor, Tensor)>,
    dev: Device,
}

/// Attention statistics gathered while a prompt's prefix `[0, s_final)` runs:
/// what the policies score. Filled chunk by chunk; memory `O(L·H·S)`.
#[derive(Clone)]
pub struct Observer {
    /// Attention received per position, summed over every query: `[L][H·S]`.
    pub received: Vec<Vec<f32>>,
    /// Mean attention of the last `window` queries (SnapKV's observation window): `[L][H·S]`.
    pub window_mean: Vec<Vec<f32>>,
    /// Attention of the last query (TOVA): `[L][H·S]`.
    pub last_query: Vec<Vec<f32>>,
    pub window: usize,
    pub s_final: usize,
}

impl Observer {
    pub fn new(n_layer: usize, n_head: usize, s_final: usize, window: usize) -> Observer {
        let window = window.clamp(1, s_final.max(1));
        let z = vec![vec![0f32; n_head * s_final]; n_layer];
        Observer {
            received: z.clone(),
            window_mean: z.clone(),
            last_query: z,
            window,
            s_final,
        }
    }

    /// Adds one chunk's attention `[G, group, T, S]` (queries at `pos0..`).
    fn add(
        &mut self,
        layer: usize,
        p: &Tensor,
        pos0: usize,
        h: usize,
        t: usize,
        s: usize,
    ) -> Result<()> {
        if pos0 >= self.s_final {
            return Ok(());
        }
        let sf = self.s_final;
        let t = t.min(sf - pos0);
        let p = p.reshape((h, p.dim(2)?, s))?.narrow(1, 0, t)?;
        let s = s.min(sf);
        let p = p.narrow(2, 0, s)?;
        let col: Vec<Vec<f32>> = p.sum(1)?.to_vec2()?;
        let acc = &mut self.received[layer];
        for (hh, c) in col.iter().enumerate() {
            for (j, x) in c.iter().enumerate() {
                acc[hh * sf + j] += x;
            }
        }
        let from = sf - self.window;
        let lo = from.max(pos0);
        let hi = sf.min(pos0 + t);
        if lo < hi {
            let rows = p.narrow(1, lo - pos0, hi - lo)?;
            let mean: Vec<Vec<f32>> = (rows.sum(1)? / self.window as f64)?.to_vec2()?;
            let w = &mut self.window_mean[layer];
            for (hh, r) in mean.iter().enumerate() {
                for (j, x) in r.iter().enumerate() {
                    w[hh * sf + j] += x;
                }
            }
            if hi == sf {
                let last: Vec<Vec<f32>> = p.narrow(1, sf - 1 - pos0, 1)?.squeeze(1)?.to_vec2()?;
                let l = &mut self.last_query[layer];
                for (hh, r) in last.iter().enumerate() {
                    l[hh * sf..hh * sf + r.len()].copy_from_slice(r);
                }
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        3 * self.received.iter().map(Vec::len).sum::<usize>() * 4
    }
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| anyhow!("the GGUF file has no `{key}` in its metadata"))
}

impl Llama {
    pub fn load(
        ct: &gguf_file::Content,
        f: &mut std::fs::File,
        path: &std::path::Path,
        dequantize: bool,
    ) -> Result<Llama> {
        let arch_name = md(ct, "general.architecture")?.to_string()?.clone();
        let Some(arch) = Arch::parse(&arch_name) else {
            bail!(
                "`{}`: architecture `{arch_name}` is not supported; the native engine runs `llama` (Llama 2/3, SmolLM2), `qwen2` and `qwen3` GGUF files",
                path.display()
            );
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| -> Result<usize> { Ok(md(ct, &key(k))?.to_u32()? as usize) };
        let hidden = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let head_dim = u("attention.key_length").unwrap_or(hidden / n_head);
        if let Ok(v) = u("attention.value_length") {
            if v != head_dim {
                bail!(
                    "`{}`: keys of {head_dim} and values of {v} per head are not supported",
                    path.display()
                );
            }
        }
        if let Ok(r) = u("rope.dimension_count") {
            if r != head_dim {
                bail!(
                    "`{}`: RoPE over {r} of {head_dim} dimensions per head is not supported",
                    path.display()
                );
            }
        }
        let hp = Hparams {
            arch,
            n_layer: u("block_count")?,
            n_head,
            n_kv_head: u("attention.head_count_kv").unwrap_or(n_head),
            head_dim,
            hidden,
            eps: md(ct, &key("attention.layer_norm_rms_epsilon"))?.to_f32()?,
            rope_base: ct
                .metadata
                .get(&key("rope.freq_base"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(10_000.0),
            context: u("context_length").unwrap_or(4096),
            swa: match arch {
                Arch::Gemma3 => Some((u("attention.sliding_window")?, 6)),
                _ => None,
            },
            // Gemma 3 27B (62 layers) scales by hidden / heads, as llama.cpp does.
            attn_scale: if arch == Arch::Gemma3 && u("block_count")? == 62 {
                1.0 / ((hidden / n_head) as f64).sqrt()
            } else {
                1.0 / (head_dim as f64).sqrt()
            },
        };
        // Linear RoPE scaling divides positions by its factor.
        let linear_scale = match ct
            .metadata
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => 1.0,
            Some("linear") => ct
                .metadata
                .get(&key("rope.scaling.factor"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(1.0),
            Some(other) => bail!(
                "`{}`: RoPE scaling `{other}` is not supported (only `linear`, and Llama 3's frequency factors)",
                path.display()
            ),
        };
        let dev = Device::Cpu;
        let mut t = |name: &str| -> Result<QTensor> {
            ct.tensor(f, name, &dev)
                .map_err(|e| anyhow!("`{}`: tensor `{name}`: {e}", path.display()))
        };
        let deq = |q: QTensor| -> Result<Tensor> { Ok(q.dequantize(&Device::Cpu)?) };
        // candle has SIMD kernels for q4_0, q8_0 and the k-quants but not for
        // q4_1 / q5_0 / q5_1: those weights are requantised to q8_0 once at load
        // (8-bit blocks hold a 4- or 5-bit block's values to within half a step).
        let matmul = |q: QTensor| -> Result<QMatMul> {
            use candle_core::quantized::GgmlDType as T;
            if dequantize {
                return Ok(QMatMul::Tensor(q.dequantize(&Device::Cpu)?));
            }
            let q = match q.dtype() {
                T::Q4_1 | T::Q5_0 | T::Q5_1 => {
                    QTensor::quantize(&q.dequantize(&Device::Cpu)?, T::Q8_0)?
                }
                _ => q,
            };
            Ok(QMatMul::from_qtensor(q)?)
        };
        let embed = t("token_embd.weight")?;
        let output = match ct.tensor_infos.contains_key("output.weight") {
            true => t("output.weight")?,
            // Tied output projection.
            false => t("token_embd.weight")?,
        };
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let mut b = |n: &str| -> Result<Tensor> { deq(t(&format!("blk.{i}.{n}"))?) };
            let bias = match arch {
                Arch::Qwen2 => Some([b("attn_q.bias")?, b("attn_k.bias")?, b("attn_v.bias")?]),
                _ => None,
            };
            let qk_norm = match arch {
                Arch::Qwen3 | Arch::Gemma3 => {
                    Some([b("attn_q_norm.weight")?, b("attn_k_norm.weight")?])
                }
                _ => None,
            };
            let post_norms = match arch {
                Arch::Gemma3 => {
                    Some([b("post_attention_norm.weight")?, b("post_ffw_norm.weight")?])
                }
                _ => None,
            };
            let mut w = |n: &str| -> Result<QTensor> { t(&format!("blk.{i}.{n}.weight")) };
            layers.push(Layer {
                attn_norm: deq(w("attn_norm")?)?,
                wq: matmul(w("attn_q")?)?,
                wk: matmul(w("attn_k")?)?,
                wv: matmul(w("attn_v")?)?,
                bias,
                qk_norm,
                post_norms,
                wo: matmul(w("attn_output")?)?,
                ffn_norm: deq(w("ffn_norm")?)?,
                gate: matmul(w("ffn_gate")?)?,
                up: matmul(w("ffn_up")?)?,
                down: matmul(w("ffn_down")?)?,
            });
        }
        let norm = deq(t("output_norm.weight")?)?;
        // RoPE tables up to the model's context: `[context][D/2]`.
        let half = hp.head_dim / 2;
        // Llama 3's frequency factors divide each frequency (llama.cpp's
        // `rope_freqs`), as linear scaling divides them all.
        let factors: Vec<f32> = match ct.tensor_infos.contains_key("rope_freqs.weight") {
            true => deq(t("rope_freqs.weight")?)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            false => vec![1.0; half],
        };
        if factors.len() != half {
            bail!(
                "`{}`: `rope_freqs.weight` has {} factors for {half} frequencies",
                path.display(),
                factors.len()
            );
        }
        // `[context][D/2]` cosines and sines for a base and a divisor.
        let tables = |base: f32, divide: &dyn Fn(usize) -> f32| -> Result<(Tensor, Tensor)> {
            let inv: Vec<f32> = (0..half)
                .map(|i| 1.0 / base.powf(2.0 * i as f32 / hp.head_dim as f32) / divide(i))
                .collect();
            let mut cos = Vec::with_capacity(hp.context * half);
            let mut sin = Vec::with_capacity(hp.context * half);
            for p in 0..hp.context {
                for f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
            Ok((
                Tensor::from_vec(cos, (hp.context, half), &dev)?,
                Tensor::from_vec(sin, (hp.context, half), &dev)?,
            ))
        };
        let (cos, sin) = tables(hp.rope_base, &|i| factors[i] * linear_scale)?;
        // llama.cpp gives Gemma 3's local layers base 10,000, unscaled.
        let local_rope = match hp.swa {
            Some(_) => Some(tables(10_000.0, &|_| 1.0)?),
            None => None,
        };
        Ok(Llama {
            hp,
            embed,
            layers,
            norm,
            output: matmul(output)?,
            cos,
            sin,
            local_rope,
            dev,
        })
    }

    /// An empty cache with room for `cap` positions in every layer.
    pub fn empty_cache(&self, quant: KvQuant, cap: usize) -> Result<KvCache> {
        let hp = &self.hp;
        KvCache::new(hp.n_layer, hp.n_kv_head, hp.head_dim, cap, quant, &self.dev)
    }

    /// Runs `tokens` at positions `pos0..` over `cache`, appends their keys and
    /// values, and returns the last token's logits. Observers record the
    /// attention statistics the policies need.
    pub fn forward(
        &self,
        tokens: &[u32],
        pos0: usize,
        cache: &mut KvCache,
        observers: &mut [&mut Observer],
    ) -> Result<Vec<f32>> {
        let mut rows = self.run(tokens, pos0, cache, observers, false)?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// [`Llama::forward`] returning every new token's logits, in order
    /// (teacher forcing: the gold answer and the full cache's answer).
    pub fn forward_all(
        &self,
        tokens: &[u32],
        pos0: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        self.run(tokens, pos0, cache, &mut [], true)
    }

    fn run(
        &self,
        tokens: &[u32],
        pos0: usize,
        cache: &mut KvCache,
        observers: &mut [&mut Observer],
        all: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let hp = &self.hp;
        let t = tokens.len();
        if t == 0 {
            bail!("nothing to run");
        }
        if pos0 + t > hp.context {
            bail!(
                "the prompt needs {} positions; the model's context is {} tokens",
                pos0 + t,
                hp.context
            );
        }
        let (h, g, d) = (hp.n_head, hp.n_kv_head, hp.head_dim);
        let group = h / g;
        let ids = Tensor::new(tokens, &self.dev)?;
        let mut x = self.embed.embedding(&ids)?; // [T, E]
        if hp.arch == Arch::Gemma3 {
            x = (x * (hp.hidden as f64).sqrt())?;
        }
        let global_rope = (self.cos.narrow(0, pos0, t)?, self.sin.narrow(0, pos0, t)?);
        let local_rope = match &self.local_rope {
            Some((c, s)) => Some((c.narrow(0, pos0, t)?, s.narrow(0, pos0, t)?)),
            None => None,
        };
        let mut masks = Masks::default();
        for (li, layer) in self.layers.iter().enumerate() {
            let window = hp.window_of(li);
            let (cos, sin) = match (&local_rope, window) {
                (Some(r), Some(_)) => (&r.0, &r.1),
                _ => (&global_rope.0, &global_rope.1),
            };
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, hp.eps)?;
            // [T, H·D] (+ bias) → [T, H, D] (→ per-head norm) → [1, H, T, D], RoPE.
            let project = |w: &QMatMul,
                           bias: Option<&Tensor>,
                           heads: usize,
                           norm: Option<&Tensor>|
             -> Result<Tensor> {
                let mut y = w.forward(&xn)?;
                if let Some(b) = bias {
                    y = y.broadcast_add(b)?;
                }
                let mut y = y.reshape((t, heads, d))?;
                if let Some(n) = norm {
                    y = candle_nn::ops::rms_norm(&y.contiguous()?, n, hp.eps)?;
                }
                Ok(y.reshape((1, t, heads, d))?.transpose(1, 2)?.contiguous()?)
            };
            let bias = |i: usize| layer.bias.as_ref().map(|b| &b[i]);
            let norm = |i: usize| layer.qk_norm.as_ref().map(|n| &n[i]);
            let q = project(&layer.wq, bias(0), h, norm(0))?;
            let k = project(&layer.wk, bias(1), g, norm(1))?;
            let v = project(&layer.wv, bias(2), g, None)?;
            let (q, k) = if hp.arch.interleaved_rope() {
                (
                    candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope(&k, cos, sin)?,
                )
            };
            // Append to the cache in place, quantised as the cache is.
            let (k, v) = (k.reshape((g, t, d))?, v.reshape((g, t, d))?);
            let (k, v) = if cache.quant == KvQuant::F16 {
                (k, v)
            } else {
                let q = |x: &Tensor| -> Result<Tensor> {
                    let mut rows = x.flatten_all()?.to_vec1::<f32>()?;
                    cache.quant.round_trip_rows(&mut rows, d);
                    Ok(Tensor::from_vec(rows, (g, t, d), &self.dev)?)
                };
                (q(&k)?, q(&v)?)
            };
            let kv = &mut cache.layers[li];
            let past = kv.len();
            let s = past + t;
            kv.append(&k, &v)?;
            // Scores: [G, group·T, D] × [G, D, S] → [G, group·T, S]; query head
            // `g·group + i` reads KV head `g`.
            let qg = q.reshape((g, group * t, d))?;
            // A sliding-window layer keeps every position (nothing is evicted
            // there), so entry `j` is position `j`, and its queries see only
            // the last `w` positions: attention reads entries `from..s`.
            let from = match window {
                Some(_) if past != pos0 => {
                    bail!("layer {li}: a sliding-window layer lost positions")
                }
                Some(w) => (past + 1).saturating_sub(w),
                None => 0,
            };
            let seen = s - from;
            let att = (kv.scores(&qg, from)? * hp.attn_scale)?;
            let att = att.reshape((g, group, t, seen))?;
            // One new token sees every entry read: no mask.
            let att = if t == 1 {
                att
            } else {
                att.broadcast_add(masks.get(t, past, window, from, &self.dev)?)?
            };
            let p = candle_nn::ops::softmax_last_dim(&att)?; // [G, group, T, S − from]
                                                             // The policies score global layers only (a window layer keeps all).
            if window.is_none() {
                for o in observers.iter_mut() {
                    o.add(li, &p, pos0, h, t, s)?;
                }
            }
            let y = kv.weighted(&p.reshape((g, group * t, seen))?, from)?; // [G, group·T, D]
            let y = y.reshape((h, t, d))?.transpose(0, 1)?.reshape((t, h * d))?;
            let post = |y: Tensor, i: usize| -> Result<Tensor> {
                Ok(match &layer.post_norms {
                    Some(n) => candle_nn::ops::rms_norm(&y, &n[i], hp.eps)?,
                    None => y,
                })
            };
            x = (x + post(layer.wo.forward(&y)?, 0)?)?;
            let xn = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, hp.eps)?;
            let gate = layer.gate.forward(&xn)?;
            let gate = match hp.arch {
                Arch::Gemma3 => gate.gelu()?,
                _ => candle_nn::ops::silu(&gate)?,
            };
            let ff = (gate * layer.up.forward(&xn)?)?;
            x = (x + post(layer.down.forward(&ff)?, 1)?)?;
        }
        let rows = if all { x } else { x.narrow(0, t - 1, 1)? };
        let rows = candle_nn::ops::rms_norm(&rows, &self.norm, hp.eps)?;
        let logits = self.output.forward(&rows)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// The masks of one forward pass, made once for each (entries before the
/// new tokens, window, first entry read) a layer asks for.
#[derive(Default)]
struct Masks(Vec<(MaskKey, Tensor)>);

/// (entries before the new tokens, window, first entry read).
type MaskKey = (usize, Option<usize>, usize);

impl Masks {
    fn get(
        &mut self,
        t: usize,
        past: usize,
        window: Option<usize>,
        from: usize,
        dev: &Device,
    ) -> Result<&Tensor> {
        let key = (past, window, from);
        let i = match self.0.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.0.push((key, causal_mask(t, past, window, from, dev)?));
                self.0.len() - 1
            }
        };
        Ok(&self.0[i].1)
    }
}

/// `[T, S − from]`: 0 where query `i` (at `past + i`) may see entry `from + j`,
/// −∞ elsewhere; with a window, only the last `window` positions (the query's
/// own included).
fn causal_mask(
    t: usize,
    past: usize,
    window: Option<usize>,
    from: usize,
    dev: &Device,
) -> Result<Tensor> {
    let s = past + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (from..s).map(move |j| {
                let q = past + i;
                let seen = j <= q && window.is_none_or(|w| q - j < w);
                if seen {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (t, s - from), dev)?)
}

/// The file's digest (blake3 of its bytes), for request identity.
pub fn file_digest(path: &std::path::Path) -> Result<String> {
    Ok(crate::engine::digest::files_digest(&[path])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_round_trip_and_only_llama_interleaves_rope() {
        for a in [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3] {
            assert_eq!(Arch::parse(a.name()), Some(a));
            assert_eq!(a.interleaved_rope(), a == Arch::Llama);
        }
        assert_eq!(Arch::parse("mistral"), None);
    }

    /// Gemma 3's pattern: five sliding-window layers, then a global one.
    #[test]
    fn every_sixth_layer_is_global_in_a_window_pattern_of_six() {
        let hp = Hparams {
            arch: Arch::Gemma3,
            n_layer: 18,
            n_head: 4,
            n_kv_head: 1,
            head_dim: 256,
            hidden: 640,
            eps: 1e-6,
            rope_base: 1e6,
            context: 32768,
            swa: Some((512, 6)),
            attn_scale: 1.0 / 16.0,
        };
        let global: Vec<usize> = (0..18).filter(|&l| hp.window_of(l).is_none()).collect();
        assert_eq!(global, [5, 11, 17]);
        assert_eq!(hp.window_of(0), Some(512));
        let dense = Hparams { swa: None, ..hp };
        assert!((0..18).all(|l| dense.window_of(l).is_none()));
    }

    /// Causal, from an offset, and within a window (the query's own
    /// position included).
    #[test]
    fn the_mask_sees_the_past_within_the_window() {
        let dev = Device::Cpu;
        let seen = |m: &Tensor| -> Vec<Vec<bool>> {
            m.to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(|v| v == 0.0).collect())
                .collect()
        };
        // Two queries at positions 2 and 3, every entry from 0.
        let m = causal_mask(2, 2, None, 0, &dev).unwrap();
        assert_eq!(
            seen(&m),
            [[true, true, true, false], [true, true, true, true]]
        );
        // A window of 2: position 3 sees 2 and 3 only.
        let m = causal_mask(2, 2, Some(2), 0, &dev).unwrap();
        assert_eq!(
            seen(&m),
            [[false, true, true, false], [false, false, true, true]]
        );
        // From entry 2 on: the columns before it are not there.
        let m = causal_mask(2, 2, Some(2), 2, &dev).unwrap();
        assert_eq!(seen(&m), [[true, false], [true, true]]);
    }
}
