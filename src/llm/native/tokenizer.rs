//! The model's own tokenizer and chat template, read from the GGUF file: a
//! byte-level BPE (vocabulary, merges and control tokens from the metadata),
//! built as a Hugging Face `tokenizers` pipeline, and ChatML rendering when the
//! file's template is ChatML (SmolLM2, Qwen2).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

pub struct GgufTokenizer {
    inner: tokenizers::Tokenizer,
    /// Tokens that end a turn (EOS and `<|im_end|>` where present).
    pub stop: Vec<u32>,
    pub chat: ChatTemplate,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` … `<|im_start|>assistant\n`.
    ChatMl,
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| anyhow!("the GGUF file has no `{key}` in its metadata"))
}

impl GgufTokenizer {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<GgufTokenizer> {
        let model = md(ct, "tokenizer.ggml.model")?.to_string()?.clone();
        if model != "gpt2" {
            bail!("tokenizer `{model}` is not supported: the native engine reads byte-level BPE (`gpt2`) vocabularies");
        }
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let tokens = md(ct, "tokenizer.ggml.tokens")?.to_vec()?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let merges = md(ct, "tokenizer.ggml.merges")?.to_vec()?;
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            let t = t.to_string()?.clone();
            // Type 3 is a control token (`<|im_start|>`, `<|endoftext|>`, …).
            if types.get(id) == Some(&3) {
                added.push(
                    json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true}),
                );
            }
            vocab.insert(t, json!(id));
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| m.to_string().map(|s| json!(s)))
            .collect::<std::result::Result<_, _>>()?;
        // Digits one by one before the GPT-2 split: SmolLM's and Qwen2's pre-tokenisers.
        let mut pre_tokenizers = Vec::new();
        if matches!(pre.as_str(), "smollm" | "qwen2" | "") {
            pre_tokenizers.push(json!({"type": "Digits", "individual_digits": true}));
        }
        pre_tokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true}));
        let spec = json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| anyhow!("building the GGUF tokenizer: {e}"))?;
        let mut stop = Vec::new();
        if let Some(eos) = ct.metadata.get("tokenizer.ggml.eos_token_id") {
            stop.push(eos.to_u32()?);
        }
        if let Some(id) = inner.token_to_id("<|im_end|>") {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
        let template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let chat = if template.contains("<|im_start|>")
            || inner.token_to_id("<|im_start|>").is_some()
        {
            ChatTemplate::ChatMl
        } else {
            bail!("the GGUF file's chat template is not ChatML; the native engine renders ChatML only (use `engine.api: completions` for plain prompts)");
        };
        Ok(GgufTokenizer { inner, stop, chat })
    }

    /// Token ids of `text`; control tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// The prompt for chat `messages` (`role`, `content`), ready for the
    /// assistant's turn.
    pub fn render_chat(&self, messages: &[(String, String)]) -> String {
        match self.chat {
            ChatTemplate::ChatMl => {
                let mut s = String::new();
                for (role, content) in messages {
                    s.push_str("<|im_start|>");
                    s.push_str(role);
                    s.push('\n');
                    s.push_str(content);
                    s.push_str("<|im_end|>\n");
                }
                s.push_str("<|im_start|>assistant\n");
                s
            }
        }
    }
}

/// Reads only a GGUF file's header and metadata.
pub fn read_content(path: &std::path::Path) -> Result<(gguf_file::Content, std::fs::File)> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("opening the model file `{}`", path.display()))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| anyhow!("`{}` is not a readable GGUF file: {e}", path.display()))?;
    Ok((ct, f))
}

/// Token ids and each token's (start, end) byte offsets in the text.
pub type Encoded = (Vec<u32>, Vec<(usize, usize)>);

impl GgufTokenizer {
    /// Token ids and their byte offsets in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoded> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }
}
