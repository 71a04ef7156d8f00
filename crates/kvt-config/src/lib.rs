//! Configuration: `config/default.yaml` merged with an experiment file, then
//! `--set` overrides, then `${VAR}` / `${VAR:-default}` from the environment and a
//! `.env` beside the experiment file; validated against `schema::Config`. Every
//! error names the file (and line when it can be found), the dotted key and what
//! was expected, and exits 2.

pub mod redact;
pub mod schema;

use std::result::Result as StdResult;

/// The configuration layer's error. Every problem with a file, key or
/// value is `Invalid` (exit 2), its message naming the file, line and key;
/// the others are failures to read or write what was valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Fix the configuration: the message says where and what.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or resolved.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The configuration layer's results.
pub type Result<T, E = ConfigError> = StdResult<T, E>;
use schema::{Config, EngineKind, Source};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The defaults shipped inside the binary, used when the project has no
/// `config/default.yaml` of its own.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../config/default.yaml");

/// The config paths that define a prepared dataset: two experiments that agree
/// on them prepare the same examples, bins and sample.
pub const DATASET_IDENTITY_KEYS: &[&str] = &[
    "dataset",
    "tokenizer.kind",
    "tokenizer.name",
    "binning",
    "sampling",
];

/// `<name>__<task>-<8 hex>`: readable, and distinct for every distinct
/// preparation, so experiments sharing a dataset name never overwrite each
/// other's `data/processed/<dataset_id>/` (the hex is blake3 over the
/// canonical JSON of `DATASET_IDENTITY_KEYS`; other keys in `slice` are ignored).
pub fn dataset_id(slice: &BTreeMap<String, Value>) -> String {
    let ident: BTreeMap<&String, &Value> = slice
        .iter()
        .filter(|(k, _)| DATASET_IDENTITY_KEYS.contains(&k.as_str()))
        .collect();
    let bytes = serde_json::to_vec(&ident).unwrap_or_default();
    let hex = blake3::hash(&bytes).to_hex();
    let field = |k: &str| {
        slice
            .get("dataset")
            .and_then(|d| d.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    format!("{}__{}-{}", field("name"), field("task"), &hex[..8])
}

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Embedded,
    Set(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "`{}`", display_path(p)),
            Origin::Embedded => write!(f, "the built-in defaults"),
            Origin::Set(arg) => write!(f, "`--set {arg}`"),
        }
    }
}

/// A loaded, validated configuration and the facts derived from it.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    /// The typed config serialized back: one encoding per value, used for keys.
    pub value: Value,
    /// Project root: the directory holding `config/default.yaml` (or the cwd).
    pub root: PathBuf,
    /// The experiment file as given on the command line.
    pub config_path: PathBuf,
    /// Where each value came from, so later checks can name file:line and key.
    layers: std::sync::Arc<Layers>,
    exp_origin: Origin,
}

impl LoadedConfig {
    /// A configuration error (exit 2) at `key`, naming the file and line the
    /// value came from: for checks that need domain knowledge the schema lacks.
    /// An error about `key` located at the line of `at` (a missing key has
    /// no line of its own: the line that made it needed stands in).
    pub fn key_error_at(&self, key: &str, at: &str, msg: &str) -> ConfigError {
        usage(format!(
            "{}: key `{key}`: {msg}",
            self.layers.locate(at, &self.exp_origin)
        ))
    }

    pub fn key_error(&self, key: &str, msg: &str) -> ConfigError {
        usage(format!(
            "{}: key `{key}`: {msg}",
            self.layers.locate(key, &self.exp_origin)
        ))
    }

    /// Things that are allowed but probably not what the user wants: printed
    /// by `kvt validate` and at the start of a build.
    pub fn warnings(&self) -> Vec<String> {
        let c = &self.config;
        let mut w = Vec::new();
        let simulator = c.engine.model_path.is_none()
            && matches!(c.engine.kind, EngineKind::Reference | EngineKind::Serve);
        if simulator && c.dataset.source != Source::Synthetic {
            w.push(format!(
                "`engine.kind: {}` runs kvt's reference simulator, whose reader only answers kvt's own synthetic tasks: on `dataset.source: {}` it scores 0 at every budget, and the scores measure the simulator, not a model. Use `engine.kind: native` (a GGUF model), `openai` or `launch`.",
                c.engine.kind, c.dataset.source
            ));
        }
        w
    }

    pub fn exp_group_id(&self) -> &str {
        &self.config.output.exp_group_id
    }
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from("runs").join(self.exp_group_id())
    }
    pub fn sqlite_path(&self) -> PathBuf {
        if self.config.db.path == "auto" {
            self.run_dir().join("kv_transition.sqlite")
        } else {
            PathBuf::from(&self.config.db.path)
        }
    }
    pub fn dataset_id(&self) -> String {
        let slice: BTreeMap<String, Value> = DATASET_IDENTITY_KEYS
            .iter()
            .filter_map(|k| get_path(&self.value, k).map(|v| (k.to_string(), v.clone())))
            .collect();
        dataset_id(&slice)
    }
    /// The cache root: `KVT_CACHE_DIR` wins over `cache.dir`; relative to the root.
    pub fn cache_dir(&self) -> PathBuf {
        let dir = std::env::var("KVT_CACHE_DIR").unwrap_or_else(|_| self.config.cache.dir.clone());
        self.root.join(dir)
    }
    /// The merged configuration with secret values replaced by `***`.
    pub fn redacted(&self) -> Value {
        let mut v = self.value.clone();
        crate::redact::value(&mut v);
        v
    }
}

/// The cache root for commands that take no experiment (`kvt cache ...`):
/// `KVT_CACHE_DIR`, else `cache.dir` from the project's `config/default.yaml`
/// (or the built-in defaults), relative to the project root.
pub fn project_cache_dir(root: &Path) -> PathBuf {
    if let Ok(d) = std::env::var("KVT_CACHE_DIR") {
        return root.join(d);
    }
    let text = std::fs::read_to_string(root.join("config/default.yaml"))
        .unwrap_or_else(|_| EMBEDDED_DEFAULT.to_string());
    let dir = parse_yaml(&text, "config/default.yaml")
        .ok()
        .and_then(|v| {
            get_path(&v, "cache.dir")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "cache".to_string());
    root.join(dir)
}

/// The remote cache for commands that take no experiment (`kvt cache
/// push|pull|du --remote`): `KVT_REMOTE`, else `cache.remote` from the
/// project's `config/default.yaml`.
pub fn project_remote(root: &Path) -> Option<String> {
    if let Ok(u) = std::env::var("KVT_REMOTE") {
        if !u.is_empty() {
            return Some(u);
        }
    }
    let text = std::fs::read_to_string(root.join("config/default.yaml")).ok()?;
    let v = parse_yaml(&text, "config/default.yaml").ok()?;
    get_path(&v, "cache.remote")
        .and_then(Value::as_str)
        .map(String::from)
}

/// Paths are shown relative to the working directory when they are below it.
pub fn display_path(p: &Path) -> String {
    if let Ok(cwd) = std::env::current_dir() {
        if let Ok(rel) = p.strip_prefix(&cwd) {
            let shown = rel.display().to_string();
            return if shown.is_empty() { ".".into() } else { shown };
        }
    }
    p.display().to_string()
}

fn usage(msg: String) -> ConfigError {
    ConfigError::Invalid(msg)
}

/// Finds the project root: the nearest ancestor of `start` with `config/default.yaml`.
pub fn find_root(start: &Path) -> Option<PathBuf> {
    let start = std::fs::canonicalize(start).ok()?;
    start
        .ancestors()
        .find(|d| d.join("config/default.yaml").is_file())
        .map(Path::to_path_buf)
}

/// One layer of YAML with the origin of every leaf, for error messages.
#[derive(Debug)]
struct Layers {
    value: Value,
    origins: BTreeMap<String, Origin>,
    texts: BTreeMap<PathBuf, String>,
}

impl Layers {
    fn origin_of(&self, path: &str) -> Option<&Origin> {
        let path = strip_indices(path);
        let mut p = path.as_str();
        loop {
            if let Some(o) = self.origins.get(p) {
                return Some(o);
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }

    /// `file:line` for a key when the file and line can be found; a key
    /// inside a flow mapping (`extra: {a: b}`) gets its parent's line.
    fn locate(&self, path: &str, fallback: &Origin) -> String {
        let origin = self.origin_of(path).unwrap_or(fallback);
        if let Origin::File(f) = origin {
            if let Some(text) = self.texts.get(f) {
                let mut p = strip_indices(path);
                loop {
                    if let Some(line) = find_key_line(text, &p) {
                        return format!("`{}:{}`", display_path(f), line);
                    }
                    match p.rfind('.') {
                        Some(i) => p.truncate(i),
                        None => break,
                    }
                }
            }
        }
        origin.to_string()
    }
}

/// `a.b[2].c[0]` → `a.b.c`: list positions do not have lines of their own.
fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0;
    for ch in path.chars() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

/// `what` (an origin as shown) with a line: `` `file:12` ``.
fn with_line(what: &str, line: usize) -> String {
    match what.strip_suffix('`') {
        Some(w) if w.starts_with('`') => format!("{w}:{line}`"),
        _ => format!("{what} line {line}"),
    }
}

fn parse_yaml(text: &str, what: &str) -> Result<Value> {
    let opts = serde_saphyr::options! { strict_booleans: true };
    let v: Value = serde_saphyr::from_str_with_options(text, opts).map_err(|e| {
        let msg = e.to_string();
        // The parser says "line L column C: …"; lead with file:line and the
        // key that line belongs to, as every other config error does.
        let pos = msg.split_once("line ").and_then(|(_, rest)| {
            let line: usize = rest.split(' ').next()?.parse().ok()?;
            let col: usize = rest
                .split_once("column ")?
                .1
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((line, col))
        });
        match pos {
            Some((line, col)) => {
                let key = key_at_line(text, line)
                    .map(|k| format!(" key `{k}`:"))
                    .unwrap_or_default();
                usage(format!(
                    "{}:{key} not valid YAML (column {col}):\n{msg}",
                    with_line(what, line)
                ))
            }
            None => usage(format!("{what} is not valid YAML:\n{msg}")),
        }
    })?;
    Ok(if v.is_null() {
        Value::Object(Map::new())
    } else {
        v
    })
}

fn record_origins(v: &Value, prefix: &str, origin: &Origin, out: &mut BTreeMap<String, Origin>) {
    if let Value::Object(m) = v {
        if !prefix.is_empty() {
            out.insert(prefix.to_string(), origin.clone());
        }
        for (k, val) in m {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            record_origins(val, &p, origin, out);
        }
    } else {
        out.insert(prefix.to_string(), origin.clone());
    }
}

/// A section that is a mapping in the defaults (`db:`, `sampling:`) must be
/// one in a config that overrides it: serde would read a list positionally
/// (`db: [auto]` as `db.path`), which nobody means.
fn check_shapes(base: &Value, over: &Value, path: &str, text: &str, what: &str) -> Result<()> {
    let (Value::Object(b), Value::Object(o)) = (base, over) else {
        return Ok(());
    };
    for (k, v) in o {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let Some(bv) = b.get(k) else { continue };
        if bv.is_object() && !v.is_object() {
            let at = find_key_line(text, &p).map_or(what.to_string(), |l| with_line(what, l));
            let found = match v {
                Value::Array(_) => "a list",
                Value::Null => "empty",
                _ => "a single value",
            };
            return Err(usage(format!(
                "{at}: key `{p}`: must be a mapping of keys (`key: value` lines or `{{key: value}}`), not {found}"
            )));
        }
        check_shapes(bv, v, &p, text, what)?;
    }
    Ok(())
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Parses one `--set a.b=value` into a path and a typed value.
pub fn parse_set(arg: &str) -> Result<(String, Value)> {
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| usage(format!("`--set {arg}`: expected `key.path=value`")))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(usage(format!(
            "`--set {arg}`: `{path}` is not a dotted key path"
        )));
    }
    Ok((path.to_string(), parse_scalar(raw)))
}

/// A command-line or environment value typed as YAML would type it
/// (`3` → number, `true` → bool, `[1, 2]` → list); anything else is a string.
fn parse_scalar(raw: &str) -> Value {
    let opts = serde_saphyr::options! { strict_booleans: true };
    match serde_saphyr::from_str_with_options::<Value>(raw, opts) {
        Ok(v) if !raw.trim().is_empty() => v,
        _ => Value::String(raw.to_string()),
    }
}

fn set_path(root: &mut Value, path: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let m = cur.as_object_mut().expect("object");
        if i + 1 == parts.len() {
            m.insert(part.to_string(), v);
            return;
        }
        cur = m
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// Looks a dotted path up in a JSON value.
pub fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |cur, k| cur.as_object()?.get(k))
}

/// Reads a `.env` file with `dotenvy` (`KEY=VALUE`, `export`, quotes,
/// comments) without touching the process environment; a missing file is
/// empty, a malformed line is a configuration error naming file:line.
fn read_dotenv(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(out);
    };
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok((k, v)) => {
                out.insert(k, v);
            }
            Err(e) => {
                let line = match &e {
                    dotenvy::Error::LineParse(l, _) => text
                        .lines()
                        .position(|t| t == l || t.trim() == l.trim())
                        .map(|i| i + 1),
                    _ => None,
                };
                return Err(usage(format!(
                    "`{}`: {e}; expected `NAME=value` lines",
                    match line {
                        Some(n) => format!("{}:{n}", display_path(path)),
                        None => display_path(path),
                    }
                )));
            }
        }
    }
    Ok(out)
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value.
fn substitute_env(
    v: &mut Value,
    path: &str,
    layers: &Layers,
    dotenv: &BTreeMap<String, String>,
) -> Result<()> {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                substitute_env(val, &p, layers, dotenv)?;
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter_mut().enumerate() {
                substitute_env(val, &format!("{path}[{i}]"), layers, dotenv)?;
            }
        }
        Value::String(s) if s.contains("${") => {
            let lookup = |name: &str| {
                std::env::var(name)
                    .ok()
                    .or_else(|| dotenv.get(name).cloned())
            };
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after.find('}').ok_or_else(|| {
                    usage(format!(
                        "{}: key `{path}`: unclosed `${{` in `{s}`",
                        layers.locate(path, &Origin::Embedded)
                    ))
                })?;
                let expr = &after[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (expr, None),
                };
                let value = match (lookup(name), default) {
                    (Some(val), Some(d)) if val.is_empty() => d.to_string(),
                    (Some(val), _) => {
                        if crate::redact::is_secret_name(name) {
                            crate::redact::remember(&val);
                        }
                        val
                    }
                    (None, Some(d)) => d.to_string(),
                    (None, None) => {
                        return Err(usage(format!(
                            "{}: key `{path}` needs environment variable `{name}`, which is not set; \
                             export it, add it to a `.env` file beside the config, or write `${{{name}:-default}}`",
                            layers.locate(path, &Origin::Embedded)
                        )))
                    }
                };
                out.push_str(&value);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *v = if whole {
                parse_scalar(&out)
            } else {
                Value::String(out)
            };
        }
        _ => {}
    }
    Ok(())
}

/// A file's text, or an error naming the line and column of its first byte
/// that is not UTF-8.
fn utf8_or_located(bytes: Vec<u8>, path: &Path) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&bytes[line_start..at]).chars().count() + 1;
        usage(format!(
            "`{}:{line}`: byte 0x{:02X} at column {column} is not UTF-8; save the file as UTF-8 (a Latin-1 `é` is the usual cause)",
            display_path(path),
            bytes[at]
        ))
    })
}

/// Loads, merges and validates the configuration for `config_path`.
pub fn load(config_path: &Path, sets: &[String]) -> Result<LoadedConfig> {
    let bytes = std::fs::read(config_path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            "; pass an experiment file with `-c`, e.g. `-c config/experiments/demo.yaml`"
        } else {
            ""
        };
        usage(format!(
            "cannot read config file `{}`: {e}{hint}",
            config_path.display()
        ))
    })?;
    let text = utf8_or_located(bytes, config_path)?;
    let abs_config = std::fs::canonicalize(config_path).map_err(|source| ConfigError::Io {
        what: format!("resolving `{}`", config_path.display()),
        source,
    })?;
    let config_dir = abs_config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let root = find_root(&config_dir)
        .or_else(|| std::env::current_dir().ok().and_then(|d| find_root(&d)))
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_default());

    let mut layers = Layers {
        value: Value::Object(Map::new()),
        origins: BTreeMap::new(),
        texts: BTreeMap::new(),
    };
    let default_path = root.join("config/default.yaml");
    let (default_text, default_origin) = match std::fs::read_to_string(&default_path) {
        Ok(t) => (t, Origin::File(default_path.clone())),
        Err(_) => (EMBEDDED_DEFAULT.to_string(), Origin::Embedded),
    };
    let exp_origin = Origin::File(abs_config.clone());
    for (t, origin) in [(default_text, default_origin), (text, exp_origin.clone())] {
        if origin == Origin::File(default_path.clone()) && abs_config == default_path {
            continue;
        }
        let what = origin.to_string();
        let v = parse_yaml(&t, &what)?;
        if !v.is_object() {
            return Err(usage(format!(
                "{}: the top level must be a mapping of keys (`key: value` lines), not {}",
                with_line(&what, 1),
                match v {
                    Value::Array(_) => "a list",
                    _ => "a single value",
                }
            )));
        }
        check_shapes(&layers.value, &v, "", &t, &what)?;
        record_origins(&v, "", &origin, &mut layers.origins);
        merge(&mut layers.value, v);
        if let Origin::File(p) = origin {
            layers.texts.insert(p, t);
        }
    }
    for arg in sets {
        let (path, v) = parse_set(arg)?;
        let origin = Origin::Set(arg.clone());
        layers.origins.insert(path.clone(), origin);
        set_path(&mut layers.value, &path, v);
    }
    let mut dotenv = read_dotenv(&config_dir.join(".env"))?;
    for (k, v) in read_dotenv(&root.join(".env"))? {
        dotenv.entry(k).or_insert(v);
    }
    let mut merged = layers.value.clone();
    substitute_env(&mut merged, "", &layers, &dotenv)?;

    let mut config: Config = serde_path_to_error::deserialize(merged.clone())
        .map_err(|e| usage(describe_schema_error(&e, &layers, &exp_origin)))?;
    check_values(&config, &layers, &exp_origin)?;
    config.kv.cells = config.kv.expand_cells();
    check_paths(&config, &root, &layers, &exp_origin)?;
    let value = serde_json::to_value(&config)?;
    Ok(LoadedConfig {
        config,
        value,
        root,
        config_path: config_path.to_path_buf(),
        layers: std::sync::Arc::new(layers),
        exp_origin,
    })
}

fn describe_schema_error(
    e: &serde_path_to_error::Error<serde_json::Error>,
    layers: &Layers,
    exp_origin: &Origin,
) -> String {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let inner = e.inner().to_string();
    let join = |p: &str, k: &str| {
        if p.is_empty() {
            k.to_string()
        } else {
            format!("{p}.{k}")
        }
    };
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        // serde_path_to_error reports the path of the unknown key itself.
        let parent = if path.ends_with(field) {
            path[..path.len() - field.len()]
                .trim_end_matches('.')
                .to_string()
        } else {
            path.clone()
        };
        let full = join(&parent, field);
        let valid: Vec<String> = inner
            .split_once("expected")
            .map(|(_, list)| {
                list.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let mut msg = format!("{}: unknown key `{full}`", layers.locate(&full, exp_origin));
        if let Some(best) = closest(field, &valid) {
            msg.push_str(&format!("; did you mean `{}`?", join(&parent, best)));
        }
        if !valid.is_empty() {
            msg.push_str(&format!(" (valid keys here: {})", valid.join(", ")));
        }
        return msg;
    }
    if let Some(rest) = inner.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or("");
        let full = join(&path, field);
        return format!(
            "{exp_origin}: missing required key `{full}`; set it in the experiment file or with `--set {full}=...`"
        );
    }
    let found = get_path(&layers.value, &strip_indices(&path))
        .map(|v| {
            let s = v.to_string();
            match s.char_indices().nth(60) {
                Some((i, _)) => format!("{}…", &s[..i]),
                None => s,
            }
        })
        .unwrap_or_default();
    let detail = inner.replace("invalid type: ", "wrong type: found ");
    format!(
        "{}: key `{path}`: {detail} (value: {found})",
        layers.locate(&path, exp_origin)
    )
}

/// A name used as one path component: letters, digits, `-`, `_`, `.`; not `.`
/// or `..`; at most 100 characters.
fn is_safe_component(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
}

/// Checks on files the config names (relative to the project root).
fn check_paths(c: &Config, root: &Path, layers: &Layers, exp_origin: &Origin) -> Result<()> {
    let Some(spec) = &c.dataset.path else {
        return Ok(());
    };
    let at = layers.locate("dataset.path", exp_origin);
    if c.dataset.source != Source::File && spec.single().is_none() {
        return Err(usage(format!(
            "{at}: key `dataset.path`: a list of files is for `dataset.source: file`; `{}` takes one path",
            c.dataset.source
        )));
    }
    if spec.patterns().is_empty() {
        return Err(usage(format!(
            "{at}: key `dataset.path`: the list is empty; name at least one file or glob"
        )));
    }
    for p in spec.patterns() {
        let path = if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            root.join(p)
        };
        let globby = p.contains(['*', '?', '[']);
        if globby && c.dataset.source != Source::File {
            return Err(usage(format!(
                "{at}: key `dataset.path`: `{p}` is a glob, which only `dataset.source: file` reads"
            )));
        }
        if !globby && !path.exists() {
            return Err(usage(format!(
                "{at}: key `dataset.path`: `{p}` does not exist (relative paths start at the project root `{}`); fix the path or set it to null",
                root.display()
            )));
        }
    }
    Ok(())
}

/// Checks that the schema's types cannot express.
fn check_values(c: &Config, layers: &Layers, exp_origin: &Origin) -> Result<()> {
    let bad = |path: &str, msg: String| {
        usage(format!(
            "{}: key `{path}`: {msg}",
            layers.locate(path, exp_origin)
        ))
    };
    if !c.kv.cells.is_empty() {
        return Err(bad(
            "kv.cells",
            "is derived from `kv.policies`, `kv.budgets` and `kv.quant` (the full cache once per quantisation, every other policy at every budget but 1.0): remove it and set those instead".into(),
        ));
    }
    let id = &c.output.exp_group_id;
    if !is_safe_component(id) {
        let shown: String = id.chars().take(60).collect();
        return Err(bad(
            "output.exp_group_id",
            format!("`{shown}` is not a safe single path component; use up to 100 letters, digits, `-`, `_` and `.` (no `/`, no `..`)"),
        ));
    }
    if c.db.path != "auto" {
        let p = Path::new(&c.db.path);
        let inside = !c.db.path.is_empty()
            && !p.is_absolute()
            && p.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            });
        if !inside {
            let shown: String = c.db.path.chars().take(80).collect();
            return Err(bad(
                "db.path",
                format!("`{shown}` is outside the project: kvt writes only inside it; give a relative path without `..` (e.g. `runs/{id}/results.sqlite`), or `auto` for `runs/{id}/kv_transition.sqlite`"),
            ));
        }
    }
    for (key, v) in [
        ("pipeline", &c.pipeline),
        ("dataset.name", &c.dataset.name),
        ("dataset.task", &c.dataset.task),
    ] {
        if !is_safe_component(v) {
            let shown: String = v.chars().take(60).collect();
            return Err(bad(
                key,
                format!("`{shown}` names a file or folder and must be one safe path component: up to 100 letters, digits, `-`, `_` and `.` (no `/`, no `..`)"),
            ));
        }
    }
    if c.dataset.source == Source::Synthetic {
        if c.dataset.lengths.is_empty() {
            return Err(bad(
                "dataset.lengths",
                "needs at least one target length (tokens), e.g. [512, 1024]".into(),
            ));
        }
        if let Some(l) = c
            .dataset
            .lengths
            .iter()
            .find(|l| !(16..=1_000_000).contains(*l))
        {
            return Err(bad(
                "dataset.lengths",
                format!("{l} is outside 16 ..= 1,000,000 tokens"),
            ));
        }
        if !(1..=100_000).contains(&c.dataset.per_length) {
            return Err(bad(
                "dataset.per_length",
                format!("{} is outside 1 ..= 100,000", c.dataset.per_length),
            ));
        }
    }
    if c.binning.n_bins > 1000 {
        return Err(bad(
            "binning.n_bins",
            format!("{} is more than 1,000 bins", c.binning.n_bins),
        ));
    }
    if let Some(e) = &c.binning.edges {
        if e.len() < 2 || e.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(
                "binning.edges",
                format!("{e:?} must hold at least two strictly increasing token counts"),
            ));
        }
    }
    if c.sampling.n_per_bin == 0 {
        return Err(bad(
            "sampling.n_per_bin",
            "must be at least 1 (examples per bin)".into(),
        ));
    }
    if !c.prompt.template.contains("{context}") {
        return Err(bad(
            "prompt.template",
            "must contain `{context}`, where the document goes".into(),
        ));
    }
    let extra = &c.dataset.fields.extra;
    if let Some(name) = extra.keys().find(|n| {
        placeholder_at(&format!("{{{n}}}")).is_none() || *n == "context" || *n == "question"
    }) {
        return Err(bad(
            &format!("dataset.fields.extra.{name}"),
            "a placeholder name is letters, digits and `_` (and not `context` or `question`)"
                .into(),
        ));
    }
    let templates = std::iter::once(("prompt.template".to_string(), &c.prompt.template)).chain(
        c.prompt
            .tasks
            .iter()
            .map(|(t, p)| (format!("prompt.tasks.{t}.template"), &p.template)),
    );
    for (key, template) in templates {
        if let Some(unknown) = placeholders(template)
            .into_iter()
            .find(|p| *p != "context" && *p != "question" && !extra.contains_key(*p))
        {
            let known: Vec<String> = ["context", "question"]
                .into_iter()
                .map(str::to_string)
                .chain(extra.keys().cloned())
                .map(|k| format!("{{{k}}}"))
                .collect();
            return Err(bad(
                &key,
                format!(
                    "names `{{{unknown}}}`, which no field fills; the placeholders are {} — map more with `dataset.fields.extra: {{{unknown}: <field path>}}`",
                    known.join(", ")
                ),
            ));
        }
    }
    if let Some((task, _)) = c
        .prompt
        .tasks
        .iter()
        .find(|(_, t)| !t.template.contains("{context}"))
    {
        let key = format!("prompt.tasks.{task}.template");
        return Err(bad(
            &key,
            "must contain `{context}`, where the document goes".into(),
        ));
    }
    if c.kv.budgets.is_empty() {
        return Err(bad("kv.budgets", "needs at least one budget".into()));
    }
    if let Some(b) = c.kv.budgets.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
        return Err(bad(
            "kv.budgets",
            format!("budget {b} must be > 0 (a fraction ≤ 1, or a token count > 1)"),
        ));
    }
    if c.binning.n_bins == 0 {
        return Err(bad("binning.n_bins", "must be at least 1".into()));
    }
    if c.kv.policies.is_empty() {
        return Err(bad("kv.policies", "needs at least one policy".into()));
    }
    if let Some((p, q)) = c.kv.policies.iter().find_map(|p| p.split_once('+')) {
        return Err(bad(
            "kv.policies",
            format!(
                "`{p}+{q}`: a KV quantisation is its own axis now: write `{p}` here and `kv.quant: [none, {q}]` (every policy runs with every quantisation; `full` once per quantisation)"
            ),
        ));
    }
    if c.kv.quant.is_empty() {
        return Err(bad(
            "kv.quant",
            "needs at least one entry (`[none]`: no quantisation)".into(),
        ));
    }
    if let Some(q) =
        c.kv.quant
            .iter()
            .find(|q| !["none", "q8_0", "q4_0"].contains(&q.as_str()))
    {
        return Err(bad(
            "kv.quant",
            format!("unknown KV quantisation `{q}`; use none, q8_0 or q4_0"),
        ));
    }
    for (key, items) in [
        ("kv.policies", c.kv.policies.clone()),
        ("kv.quant", c.kv.quant.clone()),
        (
            "kv.budgets",
            c.kv.budgets.iter().map(|b| b.to_string()).collect(),
        ),
    ] {
        if let Some(dup) = items
            .iter()
            .enumerate()
            .find(|(i, x)| items[..*i].contains(x))
            .map(|(_, x)| x)
        {
            return Err(bad(key, format!("lists `{dup}` twice; list each once")));
        }
    }
    if !(c.kv.beta.is_finite() && c.kv.beta > 0.0) {
        return Err(bad("kv.beta", format!("{} must be > 0", c.kv.beta)));
    }
    match c.engine.kind {
        EngineKind::Reference | EngineKind::Serve | EngineKind::Native => {}
        EngineKind::Launch => {
            if c.engine.launch.command.as_deref().unwrap_or("").is_empty() {
                return Err(usage(format!(
                    "{}: key `engine.launch.command`: is required when `engine.kind` is `launch` (a command template with `{{port}}`)",
                    layers.locate("engine.kind", exp_origin)
                )));
            }
        }
        EngineKind::Openai => {
            if c.engine.base_url.as_deref().unwrap_or("").is_empty() && c.engine.replicas.is_empty()
            {
                // Missing, so it has no line: point at the line that chose
                // the kind.
                return Err(usage(format!(
                    "{}: key `engine.base_url`: is required when `engine.kind` is `openai` (e.g. http://127.0.0.1:8000/v1)",
                    layers.locate("engine.kind", exp_origin)
                )));
            }
        }
    }
    if c.engine.concurrency == 0 {
        return Err(bad("engine.concurrency", "must be at least 1".into()));
    }
    if !(c.engine.timeout_s.is_finite() && c.engine.timeout_s > 0.0) {
        return Err(bad(
            "engine.timeout_s",
            "must be a positive number of seconds".into(),
        ));
    }
    if !(c.analysis.bootstrap.ci > 0.0 && c.analysis.bootstrap.ci < 1.0) {
        return Err(bad(
            "analysis.bootstrap.ci",
            "must be between 0 and 1 (e.g. 0.95)".into(),
        ));
    }
    if c.analysis.bootstrap.iters == 0 {
        return Err(bad("analysis.bootstrap.iters", "must be at least 1".into()));
    }
    check_ranges(c, &bad)
}

/// Ranges of numbers the types cannot express (one pass with the checks
/// above: `kvt validate` finds them before any stage runs).
fn check_ranges(c: &Config, bad: &dyn Fn(&str, String) -> ConfigError) -> Result<()> {
    if let Some(d) = &c.kv.decode {
        if d.interval == 0 {
            return Err(bad(
                "kv.decode.interval",
                "must be at least 1 (generated tokens between two compressions)".into(),
            ));
        }
        if !(d.target.is_finite() && d.target > 0.0) {
            return Err(bad(
                "kv.decode.target",
                format!(
                    "{} must be positive: entries a head (> 1) or a fraction of the cache when decoding starts (<= 1)",
                    d.target
                ),
            ));
        }
        if !schema::DecodeCompression::POLICIES.contains(&d.policy.as_str()) {
            return Err(bad(
                "kv.decode.policy",
                format!(
                    "`{}` cannot score a cache while it decodes (it needs the prompt's attention); use {}",
                    d.policy,
                    schema::DecodeCompression::POLICIES.join(", ")
                ),
            ));
        }
    }
    if c.engine.max_response_mib == 0 {
        return Err(bad(
            "engine.max_response_mib",
            "must be at least 1 (MiB): 0 would refuse every answer".into(),
        ));
    }
    if !(c.decoding.temperature.is_finite() && c.decoding.temperature >= 0.0) {
        return Err(bad(
            "decoding.temperature",
            format!("{} must be 0 (greedy) or more", c.decoding.temperature),
        ));
    }
    if c.decoding.max_new_tokens == 0 {
        return Err(bad(
            "decoding.max_new_tokens",
            "must be at least 1: an answer of 0 tokens scores nothing".into(),
        ));
    }
    if c.prompt.max_tokens == Some(0) {
        return Err(bad(
            "prompt.max_tokens",
            "must be at least 1 (tokens kept of each prompt), or null for no limit".into(),
        ));
    }
    let delta = c.analysis.transition.delta;
    if !(delta.is_finite() && delta > 0.0) {
        return Err(bad(
            "analysis.transition.delta",
            format!("{delta} must be positive: a loss below it counts as safe"),
        ));
    }
    if !(c.decoding.top_p > 0.0 && c.decoding.top_p <= 1.0) {
        return Err(bad(
            "decoding.top_p",
            format!("{} must be in (0, 1]", c.decoding.top_p),
        ));
    }
    let n_bins = match &c.binning.edges {
        Some(e) => e.len().saturating_sub(1) as u32,
        None => c.binning.n_bins,
    };
    if let Some(b) = c.sampling.focus_bins.iter().find(|b| **b >= n_bins) {
        return Err(bad(
            "sampling.focus_bins",
            format!(
                "bin {b} does not exist: bins are numbered 0 ..= {}",
                n_bins.saturating_sub(1)
            ),
        ));
    }
    // A budget ≤ 1 is a fraction of the prompt; above 1 a whole number of
    // tokens. 1.5 is neither.
    if let Some(b) = c.kv.budgets.iter().find(|b| **b > 1.0 && b.fract() != 0.0) {
        return Err(bad(
            "kv.budgets",
            format!("budget {b} is above 1 but not a whole number: a budget ≤ 1 is the fraction of the prompt kept (0.5), above 1 the number of tokens kept (1024)"),
        ));
    }
    if c.engine.logprobs > 20 {
        return Err(bad(
            "engine.logprobs",
            format!("{} is more than 20 (OpenAI-compatible servers give at most 20 top log-probabilities)", c.engine.logprobs),
        ));
    }
    let d = c.analysis.fidelity.delta_nats;
    if !(d.is_finite() && d > 0.0) {
        return Err(bad(
            "analysis.fidelity.delta_nats",
            format!("{d} must be a positive number of nats per token"),
        ));
    }
    let share = c.analysis.splits.calibration;
    if !(0.0..1.0).contains(&share) {
        return Err(bad(
            "analysis.splits.calibration",
            format!("{share} must be in [0, 1): the share of examples that choose thresholds (the rest are the test split)"),
        ));
    }
    let r = c.analysis.selective.confident_risk;
    if !(0.0..=1.0).contains(&r) {
        return Err(bad(
            "analysis.selective.confident_risk",
            format!("{r} must be in [0, 1]"),
        ));
    }
    Ok(())
}

pub use kvt_engine::error::closest;

/// The placeholder name at the start of `s` when `s` starts with
/// `{identifier}` (letters, digits, `_`; not starting with a digit).
pub fn placeholder_at(s: &str) -> Option<&str> {
    let body = s.strip_prefix('{')?;
    let end = body.find('}')?;
    let name = &body[..end];
    let mut chars = name.chars();
    let first = chars.next()?;
    ((first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_'))
    .then_some(name)
}

/// Every `{identifier}` placeholder in a template, in order.
pub fn placeholders(template: &str) -> Vec<&str> {
    template
        .match_indices('{')
        .filter_map(|(i, _)| placeholder_at(&template[i..]))
        .collect()
}

/// The 1-based line of a dotted key in block-style YAML, best effort.
pub fn find_key_line(text: &str, path: &str) -> Option<usize> {
    let parts: Vec<&str> = path.split('.').collect();
    let mut stack: Vec<(usize, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_string()));
        if stack.len() == parts.len() && stack.iter().zip(&parts).all(|((_, k), p)| k == p) {
            return Some(n + 1);
        }
        // A key that holds a dot itself (`"kv.budgets": …`).
        let joined: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        if joined.join(".") == path {
            return Some(n + 1);
        }
    }
    None
}

/// The dotted key a line of block-style YAML belongs to: the key on that
/// line, or the nearest one above it (best effort, for parse errors).
pub fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut last: Option<String> = None;
    for (n, l) in text.lines().enumerate().take(line) {
        let trimmed = l.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let indent = l.len() - trimmed.len();
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        if key.is_empty() || key.contains([' ', '{', '[', '\t']) {
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_string()));
        let _ = n;
        last = Some(
            stack
                .iter()
                .map(|(_, k)| k.as_str())
                .collect::<Vec<_>>()
                .join("."),
        );
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lines_of_nested_keys() {
        let text = "a:\n  b: 1\n  c:\n    d: 2\ne: 3\n";
        assert_eq!(find_key_line(text, "a.c.d"), Some(4));
        assert_eq!(find_key_line(text, "e"), Some(5));
        assert_eq!(find_key_line(text, "a.d"), None);
    }

    #[test]
    fn suggests_close_keys_only() {
        let keys = vec!["bootstrap".to_string(), "transition".to_string()];
        assert_eq!(closest("bootstrp", &keys), Some("bootstrap"));
        assert_eq!(closest("zzz", &keys), None);
    }

    #[test]
    fn set_values_are_typed() {
        assert_eq!(parse_set("a.b=3").unwrap().1, serde_json::json!(3));
        assert_eq!(parse_set("a.b=true").unwrap().1, serde_json::json!(true));
        assert_eq!(
            parse_set("a.b=[1.0, 0.5]").unwrap().1,
            serde_json::json!([1.0, 0.5])
        );
        assert_eq!(
            parse_set("a.b=hello").unwrap().1,
            serde_json::json!("hello")
        );
        assert_eq!(parse_set("a.b=no").unwrap().1, serde_json::json!("no"));
        assert!(parse_set("a..b=1").is_err());
    }
}
