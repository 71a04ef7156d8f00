//! Tiny random-weight GGUF files, one per architecture the engine reads, for
//! checking the engine against llama.cpp without downloading weights. The
//! tokenizer (vocabulary, merges, control tokens, chat template) is copied
//! from a real GGUF file, so both engines tokenise and render prompts the
//! same way and only the architecture's arithmetic is compared.

use super::model::Arch;
use anyhow::{anyhow, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The shape of a tiny model: small enough to write in a second, large
/// enough that every head, group and layer matters.
#[derive(Debug, Clone, Copy)]
pub struct TinyShape {
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
}

impl TinyShape {
    pub fn for_arch(arch: Arch) -> TinyShape {
        TinyShape {
            // Gemma 3: five sliding-window layers, then a global one.
            n_layer: if arch == Arch::Gemma3 { 6 } else { 2 },
            hidden: 64,
            n_head: 4,
            n_kv_head: 2,
            // Qwen3 decouples the head size from hidden / heads.
            head_dim: if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
                32
            } else {
                16
            },
            ffn: 128,
        }
    }
}

/// A seeded generator (SplitMix64): the same seed writes the same file.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Uniform in [-1, 1).
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> Result<QTensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * self.next()).collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
        Ok(QTensor::quantize(&t, GgmlDType::F32)?)
    }
}

/// Writes a tiny `arch` model with random weights (seeded) to `out`, its
/// tokenizer copied from the GGUF file `tokenizer_from`. `rope_freqs` adds
/// Llama 3's per-frequency RoPE factors (llama only).
pub fn write(
    arch: Arch,
    tokenizer_from: &Path,
    out: &Path,
    seed: u64,
    rope_freqs: bool,
) -> Result<()> {
    let (src, _) = super::tokenizer::read_content(tokenizer_from)?;
    let s = TinyShape::for_arch(arch);
    let vocab = src
        .metadata
        .get("tokenizer.ggml.tokens")
        .ok_or_else(|| anyhow!("`{}` has no tokenizer", tokenizer_from.display()))?
        .to_vec()?
        .len();
    let name = arch.name();
    let mut meta: Vec<(String, gguf_file::Value)> = vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(name.into()),
        ),
        (
            "general.name".into(),
            gguf_file::Value::String(format!("kvt tiny {name}")),
        ),
    ];
    let u = |v: usize| gguf_file::Value::U32(v as u32);
    for (k, v) in [
        ("context_length", u(4096)),
        ("embedding_length", u(s.hidden)),
        ("block_count", u(s.n_layer)),
        ("feed_forward_length", u(s.ffn)),
        ("attention.head_count", u(s.n_head)),
        ("attention.head_count_kv", u(s.n_kv_head)),
        ("attention.key_length", u(s.head_dim)),
        ("attention.value_length", u(s.head_dim)),
        ("rope.dimension_count", u(s.head_dim)),
        (
            "attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-6),
        ),
    ] {
        meta.push((format!("{name}.{k}"), v));
    }
    // Gemma 3's global layers use a base of a million (the local ones 10,000).
    let base = if arch == Arch::Gemma3 {
        1_000_000.0
    } else {
        10_000.0
    };
    meta.push((
        format!("{name}.rope.freq_base"),
        gguf_file::Value::F32(base),
    ));
    if arch == Arch::Gemma3 {
        // A window the test prompts (100 tokens and more) run past.
        meta.push((format!("{name}.attention.sliding_window"), u(32)));
    }
    for (k, v) in &src.metadata {
        if k.starts_with("tokenizer.") {
            meta.push((k.clone(), v.clone()));
        }
    }
    let mut rng = Rng(seed);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    // Weights of about the size a trained model's have, so activations stay
    // in range and the top logits are well apart.
    let w_in = 1.0 / (s.hidden as f32).sqrt();
    tensors.push((
        "token_embd.weight".into(),
        rng.tensor(&[vocab, s.hidden], 1.0, 0.0)?,
    ));
    tensors.push((
        "output_norm.weight".into(),
        rng.tensor(&[s.hidden], 0.1, 1.0)?,
    ));
    tensors.push((
        "output.weight".into(),
        rng.tensor(&[vocab, s.hidden], 2.0 * w_in, 0.0)?,
    ));
    if rope_freqs && arch == Arch::Llama {
        // Llama 3's shape: low frequencies slowed by up to 8, high ones kept.
        let half = s.head_dim / 2;
        let f: Vec<f32> = (0..half)
            .map(|i| 1.0 + 7.0 * i as f32 / (half - 1) as f32)
            .collect();
        let t = Tensor::from_vec(f, half, &Device::Cpu)?;
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let (q, kv) = (s.n_head * s.head_dim, s.n_kv_head * s.head_dim);
    for i in 0..s.n_layer {
        let mut put = |n: &str, t: QTensor| tensors.push((format!("blk.{i}.{n}"), t));
        put("attn_norm.weight", rng.tensor(&[s.hidden], 0.1, 1.0)?);
        put("attn_q.weight", rng.tensor(&[q, s.hidden], w_in, 0.0)?);
        put("attn_k.weight", rng.tensor(&[kv, s.hidden], w_in, 0.0)?);
        put("attn_v.weight", rng.tensor(&[kv, s.hidden], w_in, 0.0)?);
        put("attn_output.weight", rng.tensor(&[s.hidden, q], w_in, 0.0)?);
        put("ffn_norm.weight", rng.tensor(&[s.hidden], 0.1, 1.0)?);
        put(
            "ffn_gate.weight",
            rng.tensor(&[s.ffn, s.hidden], w_in, 0.0)?,
        );
        put("ffn_up.weight", rng.tensor(&[s.ffn, s.hidden], w_in, 0.0)?);
        put(
            "ffn_down.weight",
            rng.tensor(&[s.hidden, s.ffn], w_in, 0.0)?,
        );
        match arch {
            Arch::Qwen2 => {
                put("attn_q.bias", rng.tensor(&[q], 0.5, 0.0)?);
                put("attn_k.bias", rng.tensor(&[kv], 0.5, 0.0)?);
                put("attn_v.bias", rng.tensor(&[kv], 0.5, 0.0)?);
            }
            Arch::Qwen3 => {
                put("attn_q_norm.weight", rng.tensor(&[s.head_dim], 0.1, 1.0)?);
                put("attn_k_norm.weight", rng.tensor(&[s.head_dim], 0.1, 1.0)?);
            }
            Arch::Gemma3 => {
                put("attn_q_norm.weight", rng.tensor(&[s.head_dim], 0.1, 1.0)?);
                put("attn_k_norm.weight", rng.tensor(&[s.head_dim], 0.1, 1.0)?);
                put(
                    "post_attention_norm.weight",
                    rng.tensor(&[s.hidden], 0.1, 1.0)?,
                );
                put("post_ffw_norm.weight", rng.tensor(&[s.hidden], 0.1, 1.0)?);
            }
            Arch::Llama => {}
        }
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    std::io::Write::flush(&mut f)?;
    Ok(())
}
