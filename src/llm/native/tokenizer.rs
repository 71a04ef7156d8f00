//! The model's own tokenizer and chat template, read from the GGUF file,
//! built as a Hugging Face `tokenizers` pipeline:
//!
//! * `gpt2` — a byte-level BPE (vocabulary, merges and control tokens from
//!   the metadata: SmolLM2, Qwen, Llama 3);
//! * `llama` — SentencePiece-style BPE (Gemma, Llama 2): no merges in the
//!   file but a score per token; as llama.cpp does, adjacent pieces merge
//!   into the highest-scoring token they form, spaces are `▁`, and a
//!   character outside the vocabulary falls back to its bytes (`<0xXX>`).
//!   The merges are derived from the scores (a merge per way of splitting a
//!   token into two tokens, ranked by the token's score), which makes the
//!   BPE pick the same pairs in the same order.
//!
//! Chat prompts are rendered from the file's own `tokenizer.chat_template`
//! (Jinja, by minijinja with Python's string methods); a file without a chat
//! template (a base model) gets its prompt as plain text.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

pub struct GgufTokenizer {
    inner: tokenizers::Tokenizer,
    /// Tokens that end a turn (EOS and `<|im_end|>` where present).
    pub stop: Vec<u32>,
    /// None: the file has no chat template (a base model): plain prompts.
    pub chat: Option<ChatTemplate>,
    /// The token put before every prompt, when the file asks for one.
    pub bos: Option<u32>,
}

/// The file's chat template (Jinja source) and the special tokens' text it
/// may print.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// The prompt for `messages`, ready for the assistant's turn. Nothing
    /// outside the messages enters it (no date, no tools), so a prompt renders
    /// the same every time.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        env.render_str(
            &self.source,
            minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
        )
        .map_err(|e| anyhow!("rendering the GGUF file's chat template: {e:#}"))
    }
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| anyhow!("the GGUF file has no `{key}` in its metadata"))
}

impl GgufTokenizer {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<GgufTokenizer> {
        let model = md(ct, "tokenizer.ggml.model")?.to_string()?.clone();
        let inner = match model.as_str() {
            "gpt2" => byte_level_bpe(ct)?,
            "llama" => sentencepiece_bpe(ct)?,
            other => bail!("tokenizer `{other}` is not supported: the native engine reads byte-level BPE (`gpt2`) and SentencePiece-style (`llama`) vocabularies"),
        };
        let mut stop = Vec::new();
        if let Some(eos) = ct.metadata.get("tokenizer.ggml.eos_token_id") {
            stop.push(eos.to_u32()?);
        }
        for end in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>"] {
            if let Some(id) = inner.token_to_id(end) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        let template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let token_text = |key: &str| -> String {
            ct.metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| inner.id_to_token(id))
                .unwrap_or_default()
        };
        let chat = (!template.trim().is_empty()).then(|| ChatTemplate {
            source: template,
            bos_token: token_text("tokenizer.ggml.bos_token_id"),
            eos_token: token_text("tokenizer.ggml.eos_token_id"),
        });
        if let Some(c) = &chat {
            // A template that cannot render fails at load, not per request.
            c.render(&[("user".into(), "hello".into())])
                .context("the GGUF file's chat template")?;
        }
        // llama.cpp adds BOS unless the file says not to (`gpt2` files default to no).
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        let bos = match (add_bos, ct.metadata.get("tokenizer.ggml.bos_token_id")) {
            (true, Some(id)) => Some(id.to_u32()?),
            _ => None,
        };
        Ok(GgufTokenizer {
            inner,
            stop,
            chat,
            bos,
        })
    }
}

/// Each token's type (1 normal, 3 control, 4 user-defined, 6 byte); all
/// normal when the file does not say.
fn token_types(ct: &gguf_file::Content, n: usize) -> Result<Vec<i32>> {
    Ok(match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; n],
    })
}

/// The `gpt2` kind: byte-level BPE with the file's merges.
fn byte_level_bpe(ct: &gguf_file::Content) -> Result<tokenizers::Tokenizer> {
    {
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let tokens = md(ct, "tokenizer.ggml.tokens")?.to_vec()?;
        let types = token_types(ct, tokens.len())?;
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
        spec.to_string()
            .parse()
            .map_err(|e| anyhow!("building the GGUF tokenizer: {e}"))
    }
}

/// The `llama` kind: SentencePiece-style BPE from the tokens' scores.
fn sentencepiece_bpe(ct: &gguf_file::Content) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecSeq, DecoderWrapper,
    };
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{replace::Replace, NormalizerWrapper, Prepend, Sequence};
    use tokenizers::AddedToken;
    let tokens: Vec<String> = md(ct, "tokenizer.ggml.tokens")?
        .to_vec()?
        .iter()
        .map(|t| t.to_string().cloned())
        .collect::<std::result::Result<_, _>>()?;
    let scores: Vec<f32> = match ct.metadata.get("tokenizer.ggml.scores") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|x| x.to_f32().unwrap_or(0.0))
            .collect(),
        None => vec![0.0; tokens.len()],
    };
    let types = token_types(ct, tokens.len())?;
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const USER_DEFINED: i32 = 4;
    let mut vocab: std::collections::HashMap<String, u32> =
        std::collections::HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(id as u32);
    }
    let normal = |t: &str| -> bool {
        vocab
            .get(t)
            .is_some_and(|&id| types.get(id as usize) == Some(&NORMAL))
    };
    // Every way to split a normal token into two normal tokens is a merge,
    // ranked by the merged token's score (highest first, then by id).
    let mut ranked: Vec<(f32, u32, usize)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if types.get(id) != Some(&NORMAL) || t.chars().nth(1).is_none() {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            if normal(&t[..k]) && normal(&t[k..]) {
                ranked.push((scores[id], id as u32, k));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|&(_, id, k)| {
            let t = &tokens[id as usize];
            (t[..k].to_string(), t[k..].to_string())
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .byte_fallback(true)
        .build()
        .map_err(|e| anyhow!("building the SentencePiece tokenizer: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let prefix = ct
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let space = Replace::new(" ", "▁").map_err(|e| anyhow!("{e}"))?;
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(space.into());
    tok.with_normalizer(Some(Sequence::new(normalizers)))
        .map_err(|e| anyhow!("building the SentencePiece tokenizer: {e}"))?;
    let decoders: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            tokenizers::normalizers::replace::Replace::new("▁", " ").map_err(|e| anyhow!("{e}"))?,
        ),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    tok.with_decoder(Some(DecSeq::new(decoders)));
    // Control tokens (`<start_of_turn>`) and user-defined ones (runs of
    // newlines or spaces in Gemma) are matched in the raw text first, as
    // llama.cpp does.
    let added: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(id, _)| matches!(types.get(*id), Some(&CONTROL) | Some(&USER_DEFINED)))
        .map(|(id, t)| AddedToken::from(t.clone(), types[id] == CONTROL).normalized(false))
        .collect();
    tok.add_special_tokens(added)
        .map_err(|e| anyhow!("building the SentencePiece tokenizer: {e}"))?;
    Ok(tok)
}

impl GgufTokenizer {
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
    /// assistant's turn. Without a chat template (a base model), and for a
    /// plain completion (every message of role [`COMPLETION_ROLE`]), the
    /// contents as plain text, one paragraph each.
    /// A template that prints the BOS token's text loses it here when the
    /// engine puts the BOS id first anyway (no doubled BOS).
    pub fn render_chat(&self, messages: &[(String, String)]) -> Result<String> {
        let plain = messages.iter().all(|(r, _)| r == COMPLETION_ROLE);
        match &self.chat {
            Some(t) if !plain => Ok(without_bos(
                t.render(messages)?,
                &t.bos_token,
                self.bos.is_some(),
            )),
            _ => Ok(messages
                .iter()
                .map(|(_, c)| c.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")),
        }
    }
}

/// `rendered` less a leading BOS text when the engine adds the BOS id itself.
fn without_bos(rendered: String, bos_text: &str, adds_bos: bool) -> String {
    match rendered.strip_prefix(bos_text) {
        Some(rest) if adds_bos && !bos_text.is_empty() => rest.to_string(),
        _ => rendered,
    }
}

/// The role a plain completion's prompt carries (`/v1/completions`): the
/// text is the prompt as it stands, no chat template.
pub const COMPLETION_ROLE: &str = "completion";

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

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(m: &[(&str, &str)]) -> Vec<(String, String)> {
        m.iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        }
    }

    /// Templates of the three shapes GGUF files carry, written here: ChatML
    /// with a default system turn, header tokens with `bos_token` and
    /// Python string methods, and turns that refuse a role by raising.
    const CHATML: &str = "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    const HEADERS: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content.strip() }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
    const TURNS: &str = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant', 'system'] %}{{ raise_exception('unknown role ' ~ m.role) }}{% endif %}{% if m.role == 'system' %}{% set r = 'user' %}{% else %}{% set r = m.role %}{% endif %}<start_of_turn>{{ r }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

    #[test]
    fn a_chatml_template_renders_with_its_default_system_turn() {
        let t = template(CHATML);
        assert_eq!(
            t.render(&msgs(&[("user", "Hi?")])).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&msgs(&[("system", "S"), ("user", "Hi?")])).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work_in_templates() {
        assert_eq!(
            template(HEADERS).render(&msgs(&[("user", "  Hi?  ")])).unwrap(),
            "<s><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let t = template(TURNS);
        assert_eq!(
            t.render(&msgs(&[("system", "S"), ("user", "Q")])).unwrap(),
            "<s><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n"
        );
        let r = t.render(&msgs(&[("user", "Q")])).unwrap();
        assert!(without_bos(r.clone(), "<s>", true).starts_with("<start_of_turn>"));
        assert_eq!(without_bos(r.clone(), "<s>", false), r);
        assert_eq!(without_bos(r.clone(), "", true), r);
        let e = t.render(&msgs(&[("tool", "x")])).unwrap_err().to_string();
        assert!(
            e.contains("chat template") && e.contains("unknown role tool"),
            "{e}"
        );
    }
}
