//! The one redaction every printed or written command, config and log line
//! goes through (`-v` logs, errors, `kvt bundle`, `kvt resolve
//! --print-config`, report provenance). What becomes `***`:
//!
//! * the value of a secret-looking assignment (`HF_TOKEN=… vllm serve`,
//!   `export API_KEY=…;`), quoted values with spaces included;
//! * the value after a secret-looking flag (`--api-key sk-…`,
//!   `--hf-token=…`, `--password '…'`);
//! * the credentials of an `Authorization:` header;
//! * strings shaped like keys (`sk-…`, `hf_…`);
//! * any value of a secret-looking environment variable (a name with a part
//!   `TOKEN`, `SECRET`, `PASSWORD`, `AUTH`, `CREDENTIAL`, or `KEY` beside
//!   another part: `HF_TOKEN`, `OPENAI_API_KEY`) and any value a
//!   `${VAR}` substitution of such a name put into the configuration
//!   (remembered by [`remember`]), wherever it appears.
//!
//! Config values under secret-named keys (`api_key`, `password`, …) are
//! replaced whole by [`value`].

use serde_json::Value;
use std::sync::{Mutex, OnceLock};

const MASK: &str = "***";
/// Name parts (split at `_` and `-`) that mark a secret. `KEY` counts only
/// beside another part (`API_KEY`, `ACCESS_KEY`), and plurals do not count
/// (`--max-tokens` is a number).
const SECRET_PARTS: &[&str] = &[
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "AUTH",
    "AUTHORIZATION",
    "CREDENTIAL",
    "CREDENTIALS",
    "BEARER",
    "APIKEY",
];
/// kvt's own names that end in `KEY` but are digests, not secrets.
const NOT_SECRET: &[&str] = &["REQUEST_KEY", "CACHE_KEY", "NODE_KEY", "ACTION_KEY"];

/// Config keys whose whole value is a secret.
const SECRET_KEYS: &[&str] = &[
    "api_key",
    "secret",
    "password",
    "auth_token",
    "bearer_token",
];

/// Whether an environment variable or flag name looks like it holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase().replace('-', "_");
    if NOT_SECRET.iter().any(|n| upper.ends_with(n)) {
        return false;
    }
    let parts: Vec<&str> = upper.split('_').filter(|p| !p.is_empty()).collect();
    parts.iter().any(|p| SECRET_PARTS.contains(p)) || (parts.len() > 1 && parts.contains(&"KEY"))
}

fn remembered() -> &'static Mutex<Vec<String>> {
    static R: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Vec::new()))
}

/// Secret values known at start: those of secret-looking environment variables.
fn from_env() -> &'static Vec<String> {
    static E: OnceLock<Vec<String>> = OnceLock::new();
    E.get_or_init(|| {
        let mut v: Vec<String> = std::env::vars()
            .filter(|(k, val)| is_secret_name(k) && val.len() >= 6)
            .map(|(_, val)| val)
            .collect();
        // Longest first, so a secret that contains another is masked whole.
        v.sort_by_key(|s| std::cmp::Reverse(s.len()));
        v
    })
}

/// Remembers a value substituted from a secret-looking variable (a `.env`
/// file's, say), so it is masked wherever it appears later.
pub fn remember(secret: &str) {
    if secret.len() >= 4 {
        let mut r = remembered().lock().unwrap_or_else(|e| e.into_inner());
        if !r.iter().any(|s| s == secret) {
            r.push(secret.to_string());
            r.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }
}

/// Splits `s` into words at unquoted whitespace; quotes stay in the words.
/// Returns byte ranges.
fn words(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() {
            if b[i] == b'\'' || b[i] == b'"' {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            i += 1;
        }
        out.push((start, i.min(b.len())));
    }
    out
}

fn is_ident(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Masks key-shaped strings: `sk-` and 20 or more key characters (OpenAI
/// style, `-` and `_` allowed), `hf_` and 30 or more letters and digits
/// (Hugging Face tokens) — long enough that a path such as
/// `hf_tokenizer.json` is left alone.
fn mask_key_shapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    'outer: while !rest.is_empty() {
        for (prefix, min, dashes) in [("sk-", 20, true), ("hf_", 30, false)] {
            if let Some(tail) = rest.strip_prefix(prefix) {
                let boundary = out
                    .chars()
                    .last()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'));
                let n = tail
                    .find(|c: char| {
                        !(c.is_ascii_alphanumeric() || (dashes && (c == '_' || c == '-')))
                    })
                    .unwrap_or(tail.len());
                if boundary && n >= min {
                    out.push_str(MASK);
                    rest = &tail[n..];
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Masks what follows `Authorization:` (after an optional scheme word).
fn mask_authorization(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::new();
    let mut at = 0;
    while let Some(i) = lower[at..].find("authorization") {
        let mut j = at + i + "authorization".len();
        let rest = &s[j..];
        let Some(colon) = rest.find([':', '=']) else {
            break;
        };
        if !rest[..colon]
            .trim_matches(|c: char| c == '"' || c == '\'' || c.is_whitespace())
            .is_empty()
        {
            out.push_str(&s[at..j]);
            at = j;
            continue;
        }
        j += colon + 1;
        let skip_ws = |k: usize| k + s[k..].len() - s[k..].trim_start().len();
        j = skip_ws(j);
        j += s[j..].len() - s[j..].trim_start_matches(['"', '\'']).len();
        let word_end = |k: usize| {
            k + s[k..]
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ',')
                .unwrap_or(s.len() - k)
        };
        let first_end = word_end(j);
        let scheme = s[j..first_end].to_ascii_lowercase();
        if ["bearer", "basic", "token", "digest"].contains(&scheme.as_str()) {
            j = skip_ws(first_end);
        }
        let end = word_end(j);
        out.push_str(&s[at..j]);
        if end > j {
            out.push_str(MASK);
        }
        at = end;
    }
    out.push_str(&s[at..]);
    out
}

/// `s` as it may be shown or written: see the module's list.
pub fn text(s: &str) -> String {
    let s = &mask_authorization(s);
    let spans = words(s);
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    let mut mask_next = false;
    for &(a, b) in &spans {
        out.push_str(&s[last..a]);
        last = b;
        let w = &s[a..b];
        if mask_next {
            mask_next = false;
            out.push_str(MASK);
            continue;
        }
        if let Some((name, v)) = w.split_once('=') {
            let flag = name.trim_start_matches('-');
            let named = is_ident(flag) || flag.contains('-');
            if !v.is_empty() && named && is_secret_name(flag) {
                out.push_str(name);
                out.push('=');
                out.push_str(MASK);
                continue;
            }
        } else if w.starts_with('-') && is_secret_name(w.trim_start_matches('-')) {
            mask_next = true;
        }
        out.push_str(w);
    }
    out.push_str(&s[last..]);
    let mut out = mask_key_shapes(&out);
    let known = remembered()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for secret in known.iter().chain(from_env().iter()) {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), MASK);
        }
    }
    out
}

/// A configuration as it may be shown or written: values under secret-named
/// keys become `***`, every other string goes through [`text`].
pub fn value(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let lower = k.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|s| lower.ends_with(s)) && !val.is_null() {
                    *val = Value::String(MASK.into());
                } else {
                    value(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(value),
        Value::String(s) => {
            let shown = text(s);
            if shown != *s {
                *s = shown;
            }
        }
        _ => {}
    }
}

/// A writer for log lines: each event is buffered and redacted as a whole
/// before it reaches stderr (errors writing are ignored).
pub struct Stderr(Vec<u8>);

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Stderr {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let shown = text(&String::from_utf8_lossy(&self.0));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), shown.as_bytes());
        }
    }
}

/// For `tracing_subscriber::fmt().with_writer(redact::stderr)`.
pub fn stderr() -> Stderr {
    Stderr(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_a_secret_is_written_is_masked() {
        let cases = [
            ("HF_TOKEN=abc123 vllm serve m", "HF_TOKEN=*** vllm serve m"),
            (
                "SERVER_API_KEY='sk q-part1 part2' srv --port 1",
                "SERVER_API_KEY=*** srv --port 1",
            ),
            ("export API_KEY=\"a b\"; srv", "export API_KEY=*** srv"),
            ("CUDA_VISIBLE_DEVICES=0 srv", "CUDA_VISIBLE_DEVICES=0 srv"),
            (
                "srv --api-key k-123456 --port 8",
                "srv --api-key *** --port 8",
            ),
            ("srv --hf-token=abc --x=1", "srv --hf-token=*** --x=1"),
            (
                "curl -H 'Authorization: Bearer abc.def' http://x",
                "curl -H 'Authorization: Bearer ***' http://x",
            ),
            ("authorization=Basic Zm9vOmJhcg==", "authorization=*** ***"),
            ("key is sk-proj-abcdefghijklmnop_1234!", "key is ***!"),
            ("hf_ABCDEFGHIJKLMNOPQRSTabcdefghij1234 here", "*** here"),
        ];
        for (input, want) in cases {
            assert_eq!(text(input), want, "{input}");
        }
        // Flags and words that are not secrets stay.
        for keep in [
            "srv --port 8000 --model m --max-tokens 64 --sink-tokens 4",
            "--keep-alive 5 policy=streaming budget=0.5",
            "request_key=0123abcd --key file.pem",
            "sk-short is fine",
            "task-sk-abcdefghijklmnopqrstuvwxyz",
            "data/hf_tokenizer_for_the_tests_of_this_project.json",
        ] {
            assert_eq!(text(keep), keep);
        }
        remember("remembered-secret-value");
        assert_eq!(
            text("x remembered-secret-value y"),
            "x *** y",
            "a remembered substitution"
        );
    }

    #[test]
    fn config_values_are_masked_by_key_and_by_text() {
        let mut v = serde_json::json!({
            "engine": {"api_key": "abc", "api_key_env": "OPENAI_API_KEY",
                       "launch": {"command": "srv --api-key sk-literal-1234567890 --model sk-abcdefghij0123456789xyz"}},
            "list": ["A_TOKEN=x y"],
        });
        value(&mut v);
        assert_eq!(v["engine"]["api_key"], "***");
        assert_eq!(
            v["engine"]["launch"]["command"],
            "srv --api-key *** --model ***"
        );
        assert_eq!(v["list"][0], "A_TOKEN=*** y");
        // `api_key_env` names a variable; the name is not a secret.
        assert_eq!(v["engine"]["api_key_env"], "OPENAI_API_KEY");
    }
}
