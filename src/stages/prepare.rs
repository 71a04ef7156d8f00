//! `prepare`: builds the evaluation set. Generates (or, later, loads) examples,
//! counts tokens, assigns length bins, samples per bin, and writes the examples
//! and the manifest; the manifest is exported to
//! `data/processed/<dataset_id>/manifest.json` as the portable snapshot.

use crate::config::schema::{BinScheme, Binning, Dataset, Sampling, Source, Strategy, Tokenizer};
use crate::data::{binning, longbench, records, synthetic, tokenize, Example};
use crate::engine::{KeyContext, OpContext};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;

pub struct Prepare;

/// One manifest entry: which bin an example fell into, and its token length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub example_id: String,
    pub bin_idx: i64,
    pub token_len: i64,
}

/// One length bin: `[lo, hi)` in tokens (the last bin includes `hi`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    pub bin_idx: i64,
    pub lo: i64,
    pub hi: i64,
    /// Examples of the dataset in this bin before sampling.
    pub n_available: i64,
    pub n_selected: i64,
}

/// Where the records come from, for a file-backed source.
pub fn locate(ds: &Dataset, root: &Path) -> Result<Option<longbench::Source>> {
    let usage = |m: String| -> anyhow::Error { crate::KvtError::usage(m).into() };
    match ds.source {
        Source::Synthetic => Ok(None),
        Source::Longbench => {
            let explicit = match &ds.path {
                Some(spec) => Some(root.join(spec.single().ok_or_else(|| {
                    usage("config `dataset.path`: LongBench reads one place, not a list".into())
                })?)),
                None => None,
            };
            longbench::locate(&ds.task, explicit.as_deref(), root)
                .map(Some)
                .map_err(|e| usage(format!("config `dataset.task`: {e:#}")))
        }
        Source::File => {
            let spec = ds.path.as_ref().ok_or_else(|| {
                usage("config `dataset.path` is required for `dataset.source: file`".into())
            })?;
            let mut files: Vec<std::path::PathBuf> = Vec::new();
            for pat in spec.patterns() {
                let full = root.join(pat);
                let found: Vec<std::path::PathBuf> = if pat.contains(['*', '?', '[']) {
                    // The root is literal text: its own brackets are no pattern.
                    let pattern = if Path::new(pat).is_absolute() {
                        pat.to_string()
                    } else {
                        format!("{}/{pat}", glob::Pattern::escape(&root.to_string_lossy()))
                    };
                    let mut v: Vec<_> = glob::glob(&pattern)
                        .map_err(|e| {
                            usage(format!(
                                "config `dataset.path`: `{pat}` is not a valid glob ({e})"
                            ))
                        })?
                        .filter_map(|r| r.ok())
                        .filter(|p| p.is_file())
                        .collect();
                    v.sort();
                    if v.is_empty() {
                        return Err(usage(format!(
                            "config `dataset.path`: `{pat}` matches no file (relative paths start at the project root `{}`)",
                            root.display()
                        )));
                    }
                    v
                } else if full.is_file() {
                    vec![full]
                } else {
                    return Err(usage(format!(
                        "config `dataset.path`: `{}` is not a file",
                        full.display()
                    )));
                };
                for f in found {
                    if !files.contains(&f) {
                        files.push(f);
                    }
                }
            }
            let mut sources = Vec::with_capacity(files.len());
            for p in files {
                let fmt = match ds.format.as_deref() {
                    Some(f) => f.to_string(),
                    None => p
                        .extension()
                        .map(|x| x.to_string_lossy().to_string())
                        .unwrap_or_default(),
                };
                sources.push(match fmt.as_str() {
                    "jsonl" | "json" => longbench::Source::Jsonl(p),
                    "parquet" => longbench::Source::Parquet(vec![p]),
                    other => {
                        return Err(usage(format!(
                            "config `dataset.format`: `{other}` (of `{}`) is not supported; use `jsonl`, `json` (lines or one array of records) or `parquet`",
                            p.display()
                        )))
                    }
                });
            }
            Ok(Some(if sources.len() == 1 {
                sources.remove(0)
            } else {
                longbench::Source::Many(sources)
            }))
        }
    }
}

/// The source's file name(s) as the manifest records them (no absolute paths).
fn location_label(ds: &Dataset, root: &Path) -> Option<String> {
    let src = locate(ds, root).ok()??;
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    Some(match &src {
        longbench::Source::Jsonl(p) => name(p),
        longbench::Source::Zip(z, e) => format!("{}!{e}", name(z)),
        longbench::Source::Parquet(ps) => ps.iter().map(|p| name(p)).collect::<Vec<_>>().join(","),
        longbench::Source::Many(v) => v
            .iter()
            .flat_map(longbench::Source::files)
            .map(|p| name(&p))
            .collect::<Vec<_>>()
            .join(","),
    })
}

/// The examples a dataset config names; a synthetic set is sized with the
/// tiktoken encoding `sizing`.
fn load_examples(ds: &Dataset, root: &Path, sizing: &str) -> Result<records::Loaded> {
    match locate(ds, root)? {
        None => Ok(records::Loaded {
            examples: synthetic::generate(
                tokenize::encoding(sizing)?,
                &ds.task,
                ds.seed,
                &ds.lengths,
                ds.per_length,
            )
            .context("config `dataset.task`")?,
            ..Default::default()
        }),
        Some(src) => {
            let mut c = records::Collector::new(&ds.fields, ds.on_bad_record.as_str())
                .context("config `dataset.on_bad_record`")?;
            let stem = ds.task.clone();
            longbench::load(&src, &mut c, &stem)?;
            Ok(c.out)
        }
    }
}

/// LongBench-E's bins: by each record's `length` field (`meta.length`), with
/// bucket starts 0, 4000, 8000 (or `binning.edges` as starts); the last bin is
/// open above, recorded up to the longest record. Returns (bins, edges, the
/// length each example is binned by).
fn longbench_e_bins(
    examples: &[Example],
    starts: Option<&[u64]>,
) -> Result<(usize, Vec<usize>, Vec<usize>)> {
    let starts: Vec<usize> = match starts {
        Some(s) => {
            if s.first() != Some(&0) || s.windows(2).any(|w| w[0] >= w[1]) {
                return Err(crate::KvtError::usage(format!(
                    "config `binning.edges`: with `binning.scheme: longbench_e` the edges are bucket starts, increasing from 0 (e.g. [0, 4000, 8000]); got {s:?}"
                ))
                .into());
            }
            s.iter().map(|&x| x as usize).collect()
        }
        None => crate::metrics::longbench::LONGBENCH_E_EDGES
            .iter()
            .map(|&x| x as usize)
            .collect(),
    };
    let mut lens = Vec::with_capacity(examples.len());
    for e in examples {
        let l = e.meta.get("length").and_then(serde_json::Value::as_u64).ok_or_else(|| {
            crate::KvtError::usage(format!(
                "example `{}` has no numeric `length`: `binning.scheme: longbench_e` bins by each record's `length` field; list it in `dataset.fields.meta` (LongBench-E records have it), or use `binning.scheme: tokens`",
                e.example_id
            ))
        })?;
        lens.push(l as usize);
    }
    let last = *starts.last().expect("at least one start");
    let top = lens.iter().copied().max().unwrap_or(0).max(last + 1);
    let mut edges = starts;
    edges.push(top);
    Ok((edges.len() - 1, edges, lens))
}

/// LongBench v2's length classes, in order, and their ranges in words.
pub const LENGTH_CLASSES: [(&str, usize); 3] =
    [("short", 0), ("medium", 32_000), ("long", 128_000)];
const LENGTH_CLASS_TOP: usize = 2_000_000;

/// Bins by each record's length class (`meta.length`: short, medium,
/// long): (bins, edges in words, the length each example is binned by —
/// its class's lower edge).
fn length_class_bins(examples: &[Example]) -> Result<(usize, Vec<usize>, Vec<usize>)> {
    let mut edges: Vec<usize> = LENGTH_CLASSES.iter().map(|c| c.1).collect();
    edges.push(LENGTH_CLASS_TOP);
    let lens = examples
        .iter()
        .map(|e| {
            let class = e.meta.get("length").and_then(serde_json::Value::as_str);
            LENGTH_CLASSES
                .iter()
                .find(|c| Some(c.0) == class)
                .map(|c| c.1)
                .ok_or_else(|| {
                    crate::KvtError::usage(format!(
                        "example `{}` has no length class (`length`: short, medium or long, got {}): `binning.scheme: length_class` bins by LongBench v2's classes; list `length` in `dataset.fields.meta`, or use `binning.scheme: tokens`",
                        e.example_id,
                        e.meta.get("length").map_or("nothing".into(), |v| v.to_string())
                    ))
                    .into()
                })
        })
        .collect::<Result<Vec<usize>>>()?;
    Ok((LENGTH_CLASSES.len(), edges, lens))
}

/// The metric-fit warning for a file-backed dataset (`kvt validate`): the
/// records are loaded as `prepare` would; `None` when they fit, cannot be
/// read (prepare reports that) or the dataset is synthetic.
pub fn metric_fit(ds: &Dataset, root: &Path) -> Option<String> {
    if ds.source == Source::Synthetic {
        return None;
    }
    let metric =
        crate::stages::score::metric_for(ds.source.as_str(), &ds.task, ds.metric.as_deref())
            .ok()?;
    let src = locate(ds, root).ok()??;
    let mut c = records::Collector::new(&ds.fields, "skip").ok()?;
    longbench::load(&src, &mut c, &ds.task).ok()?;
    crate::stages::score::metric_fit_warning(&metric, &c.out.examples)
}

/// What `prepare` reads (its stage's `uses`, exactly).
#[derive(serde::Deserialize)]
pub struct Uses {
    dataset: Dataset,
    #[serde(rename = "tokenizer.kind")]
    tokenizer_kind: crate::config::schema::TokenizerKind,
    #[serde(rename = "tokenizer.name")]
    tokenizer_name: String,
    binning: Binning,
    sampling: Sampling,
}

impl Uses {
    fn tokenizer(&self) -> Tokenizer {
        Tokenizer {
            kind: self.tokenizer_kind,
            name: self.tokenizer_name.clone(),
            url: None,
        }
    }
}

/// The servers `prepare` may ask for token counts (transport, not identity).
#[derive(serde::Deserialize)]
pub struct Transport {
    #[serde(rename = "tokenizer.url")]
    tokenizer_url: Option<String>,
    #[serde(rename = "engine.base_url")]
    engine_url: Option<String>,
}

impl crate::stages::Stage for Prepare {
    fn name(&self) -> &'static str {
        "prepare"
    }
    /// A file-backed dataset enters the key by the digest of its bytes.
    fn fingerprint(&self, ctx: &KeyContext, u: &Uses, _: &Transport) -> Result<Option<String>> {
        let (ds, tok) = (&u.dataset, u.tokenizer());
        // A Hugging Face tokenizer.json counts by its bytes, not its name.
        let tok_id = tokenize::file_identity(&tok, ctx.root)?;
        let Some(src) = locate(ds, ctx.root)? else {
            return Ok(tok_id);
        };
        let digest = crate::engine::digest::files_digest_cached(ctx.cache_root, &src.files())?;
        let data = format!(
            "{} {}",
            location_label(ds, ctx.root).unwrap_or_default(),
            digest
        );
        Ok(Some(match tok_id {
            Some(t) => format!("{data}; {t}"),
            None => data,
        }))
    }
    /// Bump when generation, binning, sampling or the artifact layout changes.
    fn version(&self) -> u32 {
        // 5: token counts come only from checksummed rows; a preparation
        // that may have read a damaged count of the old table is redone.
        // 6: default edges a bin per synthetic target, or rounded quantiles.
        6
    }
    type Uses = Uses;
    type Transport = Transport;
    fn run(&self, ctx: &mut OpContext, uses: Self::Uses, transport: Self::Transport) -> Result<()> {
        let u = uses;
        let t = transport;
        let tok = u.tokenizer();
        let Uses {
            dataset: ds,
            binning: bins,
            sampling,
            ..
        } = u;
        let engine_url = t.engine_url;
        let mut tok_cfg = tok.clone();
        tok_cfg.url = t.tokenizer_url;
        if tok_cfg.kind == crate::config::schema::TokenizerKind::Tiktoken {
            // The counter's rank table loads on the other core while this
            // one reads the input.
            tokenize::prefetch(&tok_cfg.name);
        }
        let t0 = std::time::Instant::now();
        let counter = tokenize::Tok::load(&tok_cfg, ctx.root(), engine_url.as_deref())?;
        // Synthetic prompts are sized with a tiktoken encoding (the configured
        // one, else cl100k_base); bins always use the configured tokenizer.
        let sizing = match &counter {
            tokenize::Tok::Tiktoken(name) => name.as_str(),
            _ => "cl100k_base",
        };
        let loaded = load_examples(&ds, ctx.root(), sizing)?;
        let (examples, skipped) = (loaded.examples, loaded.skipped);
        if let Some(first) = &loaded.first_skip {
            tracing::warn!("skipped {skipped} bad record(s); the first: {first}");
        }
        let mut examples =
            crate::data::ops::apply(examples, &ds.ops).context("config `dataset.ops`")?;
        crate::data::number_turns(&mut examples).context("config `dataset.fields.group`")?;
        if let Ok(metric) =
            crate::stages::score::metric_for(ds.source.as_str(), &ds.task, ds.metric.as_deref())
        {
            if let Some(w) = crate::stages::score::metric_fit_warning(&metric, &examples) {
                tracing::warn!("{w}");
            }
        }
        if examples.is_empty() {
            let from = location_label(&ds, ctx.root())
                .map(|l| format!(" from `{l}`"))
                .unwrap_or_default();
            anyhow::bail!(
                "the dataset has no examples ({}{from}): check `dataset.source`, `dataset.lengths` / `dataset.per_length`, `dataset.ops`, or the data file",
                if skipped > 0 { format!("{skipped} bad records skipped") } else { "none loaded".into() }
            );
        }
        let n_loaded = examples.len();
        tracing::debug!("prepare: {n_loaded} examples loaded at {:?}", t0.elapsed());
        let texts: Vec<&str> = examples.iter().map(|e| e.context.as_str()).collect();
        let lengths = counter
            .count_many(&texts, Some(ctx.cache_root))
            .context("counting tokens")?;
        tracing::debug!("prepare: tokens counted at {:?}", t0.elapsed());
        let (n_bins, edges, bin_lengths) = match bins.scheme {
            BinScheme::Tokens => {
                let n_bins = bins.n_bins as usize;
                let edges: Vec<usize> = match &bins.edges {
                    Some(e) => {
                        if e.len() != n_bins + 1 || e.windows(2).any(|w| w[0] >= w[1]) {
                            anyhow::bail!("config `binning.edges`: expected {} increasing edges for {n_bins} bins, got {e:?}", n_bins + 1);
                        }
                        e.iter().map(|&x| x as usize).collect()
                    }
                    None => {
                        // Synthetic prompts made at as many target lengths
                        // as there are bins: a bin per target. Otherwise
                        // quantiles, rounded where no example moves.
                        let mut targets: Vec<usize> =
                            ds.lengths.iter().map(|&l| l as usize).collect();
                        targets.sort_unstable();
                        targets.dedup();
                        if ds.source == Source::Synthetic && targets.len() == n_bins {
                            binning::target_edges(&targets)
                        } else {
                            binning::round_edges(
                                &binning::quantile_edges(&lengths, n_bins),
                                &lengths,
                            )
                        }
                    }
                };
                (n_bins, edges, lengths.clone())
            }
            BinScheme::LongbenchE => longbench_e_bins(&examples, bins.edges.as_deref())?,
            BinScheme::LengthClass => length_class_bins(&examples)?,
        };
        let items: Vec<(String, usize)> = examples
            .iter()
            .zip(&bin_lengths)
            .map(|(e, &l)| (e.example_id.clone(), binning::bin_of(l, &edges)))
            .collect();
        let per_bin = |b: usize| -> usize {
            match sampling.strategy {
                Strategy::FocusTransition if sampling.focus_bins.contains(&(b as u32)) => {
                    sampling.focus_n_per_bin as usize
                }
                _ => sampling.n_per_bin as usize,
            }
        };
        // A context's questions are sampled together: the unit drawn is the
        // group (`n_per_bin` contexts), and a pinned question pins its group.
        let unit_of = |e: &Example| e.group().unwrap_or(&e.example_id).to_string();
        let units: std::collections::BTreeMap<String, String> = examples
            .iter()
            .map(|e| (e.example_id.clone(), unit_of(e)))
            .collect();
        let grouped = examples.iter().any(|e| e.group().is_some());
        let chosen = if grouped {
            // A group's questions share their context, so its bin.
            let unit_items: Vec<(String, usize)> = items
                .iter()
                .map(|(id, b)| (units[id].clone(), *b))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let pinned: Vec<String> = sampling
                .pinned
                .iter()
                .map(|p| {
                    units.get(p).cloned().ok_or_else(|| {
                        anyhow::anyhow!("pinned example `{p}` is not in the dataset")
                    })
                })
                .collect::<Result<_>>()
                .context("config `sampling.pinned`")?;
            let picked: std::collections::BTreeSet<String> =
                binning::sample(&unit_items, n_bins, &per_bin, &pinned, sampling.seed)?
                    .into_iter()
                    .map(|(u, _)| u)
                    .collect();
            items
                .iter()
                .filter(|(id, _)| picked.contains(&units[id]))
                .cloned()
                .collect()
        } else {
            binning::sample(&items, n_bins, &per_bin, &sampling.pinned, sampling.seed)
                .context("config `sampling.pinned`")?
        };

        let by_id: std::collections::BTreeMap<&str, (&Example, usize)> = examples
            .iter()
            .zip(&lengths)
            .map(|(e, &l)| (e.example_id.as_str(), (e, l)))
            .collect();
        let mut rows: Vec<(usize, &str, usize)> = chosen
            .iter()
            .map(|(id, b)| (by_id[id.as_str()].1, id.as_str(), *b))
            .collect();
        rows.sort();
        let entries: Vec<Entry> = rows
            .iter()
            .map(|(len, id, b)| Entry {
                example_id: id.to_string(),
                bin_idx: *b as i64,
                token_len: *len as i64,
            })
            .collect();
        let bin_rows: Vec<Bin> = (0..n_bins)
            .map(|b| Bin {
                bin_idx: b as i64,
                lo: edges[b] as i64,
                hi: edges[b + 1] as i64,
                n_available: items.iter().filter(|(_, x)| *x == b).count() as i64,
                n_selected: entries.iter().filter(|e| e.bin_idx == b as i64).count() as i64,
            })
            .collect();
        let selected: Vec<&Example> = rows.iter().map(|(_, id, _)| by_id[id].0).collect();
        let dataset_id = crate::config::dataset_id(ctx.key.config);
        let manifest = json!({
            "dataset": {"name": ds.name, "task": ds.task, "dataset_id": dataset_id, "source": ds.source,
                        "location": location_label(&ds, ctx.root()), "n_loaded": n_loaded,
                        "n_skipped_records": skipped},
            "tokenizer": tok.name,
            "n_bins": n_bins,
            "binning_scheme": bins.scheme,
            "n_per_bin": sampling.n_per_bin,
            "bin_edges": edges,
            "entries": entries,
            "examples": selected,
        });
        tracing::debug!("prepare: sampled at {:?}", t0.elapsed());
        ctx.put("examples", &crate::table::write(&selected)?)?;
        ctx.put("manifest", &crate::table::write(&entries)?)?;
        ctx.put("bins", &crate::table::write(&bin_rows)?)?;
        let mut bytes = serde_json::to_vec_pretty(&manifest)?;
        bytes.push(b'\n');
        ctx.put("manifest_json", &bytes)?;
        tracing::debug!("prepare: written at {:?}", t0.elapsed());
        ctx.export(
            "manifest_json",
            format!("data/processed/{dataset_id}/manifest.json"),
        );
        Ok(())
    }
}
