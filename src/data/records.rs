//! Long-context records from files: JSON lines or Parquet, turned into the
//! canonical [`Example`] through a field mapping (`dataset.fields`). Broken
//! records fail with `file:line` and the field, or are skipped and counted
//! (`dataset.on_bad_record: skip`).

use super::Example;
use crate::config::schema::Fields;
use anyhow::{anyhow, bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The `meta` key holding where a record came from: `file.jsonl:LINE` or
/// `file.parquet:row N`.
pub const PROVENANCE_KEY: &str = "source_record";

/// What loading produced: the examples, and how many records were skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    pub examples: Vec<Example>,
    pub skipped: usize,
    /// The first skipped record's reason, for the log and the report.
    pub first_skip: Option<String>,
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The value at a field path: the whole path as a key first (flat records
/// with dotted names), else nested keys separated by `.` with list positions
/// in brackets: `meta.answer`, `topics[0]`, `turns[2].text`.
pub fn lookup<'a>(rec: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = rec.get(path) {
        return Some(v);
    }
    let mut cur: Option<&Value> = None;
    for (i, seg) in path.split('.').enumerate() {
        let (key, mut rest) = match seg.find('[') {
            Some(b) => (&seg[..b], &seg[b..]),
            None => (seg, ""),
        };
        if !key.is_empty() {
            cur = match (i, cur) {
                (0, _) => rec.get(key),
                (_, Some(Value::Object(m))) => m.get(key),
                _ => None,
            };
        } else if i == 0 {
            return None;
        }
        while let Some(r) = rest.strip_prefix('[') {
            let (n, after) = r.split_once(']')?;
            let n: usize = n.trim().parse().ok()?;
            cur = match cur {
                Some(Value::Array(a)) => a.get(n),
                _ => None,
            };
            rest = after;
        }
        if !rest.is_empty() {
            return None;
        }
        cur?;
    }
    cur
}

/// One record → one example, or the reason it cannot be one.
pub fn to_example(
    rec: &Map<String, Value>,
    f: &Fields,
    fallback_id: &str,
) -> Result<Example, String> {
    let field = |name: &str, key: &str| -> Result<&Value, String> {
        lookup(rec, name).ok_or_else(|| {
            format!("record has no field `{name}` (mapped by `dataset.fields.{key}`)")
        })
    };
    let question = match &f.question {
        Some(q) => {
            text_of(field(q, "question")?).ok_or_else(|| format!("field `{q}` is not a string"))?
        }
        None => String::new(),
    };
    let context = text_of(field(&f.context, "context")?)
        .ok_or_else(|| format!("field `{}` is not a string", f.context))?;
    let answers = match field(&f.answers, "answers")? {
        Value::Array(a) => a
            .iter()
            .map(|x| {
                text_of(x).ok_or_else(|| format!("field `{}` holds a non-string answer", f.answers))
            })
            .collect::<Result<Vec<_>, _>>()?,
        v => vec![text_of(v)
            .ok_or_else(|| format!("field `{}` is neither a string nor a list", f.answers))?],
    };
    if context.trim().is_empty() {
        return Err(format!("field `{}` (the context) is empty", f.context));
    }
    if answers.iter().all(|a| a.trim().is_empty()) {
        return Err(format!(
            "field `{}` has no answer (an example without a reference answer cannot be scored)",
            f.answers
        ));
    }
    let example_id = match &f.id {
        Some(idf) => {
            text_of(field(idf, "id")?).ok_or_else(|| format!("field `{idf}` is not a string"))?
        }
        None => fallback_id.to_string(),
    };
    let mut extra = std::collections::BTreeMap::new();
    for (name, path) in &f.extra {
        let v = lookup(rec, path).filter(|v| !v.is_null()).ok_or_else(|| {
            format!("record has no field `{path}` (mapped by `dataset.fields.extra.{name}`)")
        })?;
        extra.insert(name.clone(), prompt_text(v));
    }
    let mut meta = Map::new();
    for m in &f.meta {
        if let Some(v) = lookup(rec, m) {
            meta.insert(m.clone(), v.clone());
        }
    }
    if let Some(g) = &f.group {
        let v = field(g, "group")?;
        let g = text_of(v)
            .or_else(|| v.as_i64().map(|n| n.to_string()))
            .ok_or_else(|| format!("field `{g}` (the group) is neither a string nor an integer"))?;
        meta.insert(super::GROUP.into(), Value::from(g));
    }
    Ok(Example {
        example_id,
        question,
        context,
        answers,
        meta,
        extra,
    })
}

/// A field's value as a prompt shows it: text and numbers as they are, a list
/// one item per line, anything else as JSON.
fn prompt_text(v: &Value) -> String {
    match v {
        Value::Array(items) => items.iter().map(prompt_text).collect::<Vec<_>>().join("\n"),
        Value::Bool(b) => b.to_string(),
        v => text_of(v).unwrap_or_else(|| v.to_string()),
    }
}

/// Collects examples, enforcing unique ids and the bad-record policy.
pub struct Collector<'a> {
    fields: &'a Fields,
    skip_bad: bool,
    seen: HashMap<String, String>,
    pub out: Loaded,
}

impl<'a> Collector<'a> {
    pub fn new(fields: &'a Fields, on_bad_record: &str) -> Result<Self> {
        let skip_bad = match on_bad_record {
            "fail" => false,
            "skip" => true,
            other => bail!("`dataset.on_bad_record` is `{other}`; use `fail` or `skip`"),
        };
        Ok(Collector {
            fields,
            skip_bad,
            seen: HashMap::new(),
            out: Loaded::default(),
        })
    }

    fn bad(&mut self, at: &str, why: String) -> Result<()> {
        if self.skip_bad {
            self.out.skipped += 1;
            self.out.first_skip.get_or_insert(format!("{at}: {why}"));
            Ok(())
        } else {
            Err(anyhow!(
                "`{at}`: {why}; fix the record, or set `dataset.on_bad_record: skip` to skip and count bad records"
            ))
        }
    }

    /// A parsed record from `at` (`file:line`); `fallback_id` names it when no id field is mapped.
    pub fn record(
        &mut self,
        at: &str,
        rec: Result<Value, String>,
        fallback_id: &str,
    ) -> Result<()> {
        let rec = match rec {
            Ok(Value::Object(m)) => m,
            Ok(_) => return self.bad(at, "the line is not a JSON object".into()),
            Err(e) => return self.bad(at, format!("not valid JSON ({e})")),
        };
        match to_example(&rec, self.fields, fallback_id) {
            Ok(mut ex) => {
                // Provenance: the file (not its directory) and line or row.
                let file_line = at.rsplit(['/', '\\']).next().unwrap_or(at);
                ex.meta
                    .insert(PROVENANCE_KEY.into(), Value::from(file_line.to_string()));
                if let Some(first) = self.seen.get(&ex.example_id) {
                    bail!(
                        "`{at}`: duplicate example id `{}` (first at `{first}`); ids must be unique — map another field with `dataset.fields.id`, or set it to null to number records",
                        ex.example_id
                    );
                }
                self.seen.insert(ex.example_id.clone(), at.to_string());
                self.out.examples.push(ex);
                Ok(())
            }
            Err(why) => self.bad(at, why),
        }
    }

    /// Every line of a JSON-lines file; blank lines are ignored. A line that
    /// is not valid UTF-8 is a bad record of its own (the rest still load).
    /// A file that is one JSON array of records (LongBench v2's `data.json`)
    /// goes to [`Collector::json_array`].
    pub fn jsonl(&mut self, origin: &str, bytes: impl AsRef<[u8]>, stem: &str) -> Result<()> {
        // A byte-order mark (Windows editors write one) is not part of the data.
        let bytes = bytes.as_ref();
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return self.json_array(origin, bytes, stem);
        }
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let at = format!("{origin}:{}", i + 1);
            let line = match std::str::from_utf8(raw) {
                Ok(l) => l,
                Err(e) => {
                    self.bad(
                        &at,
                        format!(
                            "the line is not valid UTF-8 (at byte {} of the line)",
                            e.valid_up_to() + 1
                        ),
                    )?;
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let rec = serde_json::from_str::<Value>(line).map_err(|e| e.to_string());
            self.record(&at, rec, &format!("{stem}-{}", i + 1))?;
        }
        Ok(())
    }

    /// Every element of a file that is one JSON array of records
    /// (`origin:record N` in errors, counting from 1), read one record at a
    /// time: a file of hundreds of megabytes is never one tree in memory.
    /// The array itself must be valid JSON (an error names its line and
    /// column); a bad record inside it follows `dataset.on_bad_record`.
    pub fn json_array(&mut self, origin: &str, bytes: &[u8], stem: &str) -> Result<()> {
        use serde::de::{Deserializer as _, Error as _, SeqAccess, Visitor};
        struct Each<'c, 'a> {
            c: &'c mut Collector<'a>,
            origin: &'c str,
            stem: &'c str,
            stopped: &'c mut Option<anyhow::Error>,
        }
        impl<'de> Visitor<'de> for Each<'_, '_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of records")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                let mut i = 0;
                while let Some(v) = seq.next_element::<Value>()? {
                    i += 1;
                    let at = format!("{}:record {i}", self.origin);
                    let id = format!("{}-{i}", self.stem);
                    if let Err(e) = self.c.record(&at, Ok(v), &id) {
                        *self.stopped = Some(e);
                        return Err(A::Error::custom("stopped"));
                    }
                }
                Ok(())
            }
        }
        let mut stopped = None;
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let read = de.deserialize_seq(Each {
            c: self,
            origin,
            stem,
            stopped: &mut stopped,
        });
        if let Some(e) = stopped {
            return Err(e);
        }
        read.and_then(|()| de.end())
            .map_err(|e| anyhow!("`{origin}`: not a valid JSON array of records ({e})"))
    }

    /// Every row of a Parquet file (`origin:row N` in errors, counting from 1).
    pub fn parquet(&mut self, origin: &str, bytes: &[u8], stem: &str) -> Result<()> {
        for (i, rec) in parquet_rows(bytes)
            .map_err(|e| anyhow!("`{origin}`: not a readable Parquet file ({e})"))?
            .into_iter()
            .enumerate()
        {
            let at = format!("{origin}:row {}", i + 1);
            self.record(&at, Ok(Value::Object(rec)), &format!("{stem}-{}", i + 1))?;
        }
        Ok(())
    }
}

/// Any Parquet file's rows as JSON objects (strings, numbers, booleans, lists).
pub fn parquet_rows(bytes: &[u8]) -> Result<Vec<Map<String, Value>>> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::copy_from_slice(bytes),
    )?
    .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let schema = batch.schema();
        let start = out.len();
        out.extend((0..batch.num_rows()).map(|_| Map::new()));
        for (c, field) in schema.fields().iter().enumerate() {
            let col = batch.column(c);
            for r in 0..batch.num_rows() {
                out[start + r].insert(field.name().clone(), json_at(col, r)?);
            }
        }
    }
    Ok(out)
}

fn json_at(col: &ArrayRef, i: usize) -> Result<Value> {
    if col.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match col.data_type() {
        DataType::Utf8 => Value::from(col.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(col.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(col.as_string_view().value(i)),
        DataType::Boolean => Value::from(col.as_boolean().value(i)),
        DataType::Int8 => Value::from(col.as_primitive::<arrow_array::types::Int8Type>().value(i)),
        DataType::Int16 => {
            Value::from(col.as_primitive::<arrow_array::types::Int16Type>().value(i))
        }
        DataType::Int32 => {
            Value::from(col.as_primitive::<arrow_array::types::Int32Type>().value(i))
        }
        DataType::Int64 => {
            Value::from(col.as_primitive::<arrow_array::types::Int64Type>().value(i))
        }
        DataType::UInt32 => Value::from(
            col.as_primitive::<arrow_array::types::UInt32Type>()
                .value(i),
        ),
        DataType::UInt64 => Value::from(
            col.as_primitive::<arrow_array::types::UInt64Type>()
                .value(i),
        ),
        DataType::Float32 => Value::from(
            col.as_primitive::<arrow_array::types::Float32Type>()
                .value(i),
        ),
        DataType::Float64 => Value::from(
            col.as_primitive::<arrow_array::types::Float64Type>()
                .value(i),
        ),
        DataType::List(_) => {
            let l = col.as_list::<i32>().value(i);
            Value::Array(
                (0..l.len())
                    .map(|k| json_at(&l, k))
                    .collect::<Result<_>>()?,
            )
        }
        DataType::LargeList(_) => {
            let l = col.as_list::<i64>().value(i);
            Value::Array(
                (0..l.len())
                    .map(|k| json_at(&l, k))
                    .collect::<Result<_>>()?,
            )
        }
        other => bail!("unsupported Parquet column type {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        Fields {
            id: Some("_id".into()),
            question: Some("input".into()),
            context: "context".into(),
            answers: "answers".into(),
            meta: vec!["length".into(), "all_classes".into()],
            extra: Default::default(),
            group: None,
        }
    }

    #[test]
    fn records_map_to_examples() {
        let f = fields();
        let mut c = Collector::new(&f, "fail").unwrap();
        c.jsonl(
            "d.jsonl",
            "{\"_id\": \"a\", \"input\": \"q?\", \"context\": \"ctx\", \"answers\": [\"x\", \"y\"], \"length\": 3, \"all_classes\": null}\n\n{\"_id\": \"b\", \"input\": \"q2\", \"context\": \"c2\", \"answers\": \"z\"}\n",
            "d",
        )
        .unwrap();
        let ex = &c.out.examples;
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].answers, vec!["x", "y"]);
        assert_eq!(ex[0].meta["length"], 3);
        assert_eq!(
            ex[1].answers,
            vec!["z"],
            "a string answer becomes a list of one"
        );
    }

    #[test]
    fn bad_records_fail_with_file_line_and_field_or_are_counted() {
        let f = fields();
        let text = "{\"_id\": \"a\", \"input\": \"q\", \"context\": \"c\", \"answers\": [\"x\"]}\n{broken\n{\"_id\": \"c\", \"context\": \"c\", \"answers\": [\"x\"]}\n{\"_id\": \"d\", \"input\": \"q\", \"context\": \"  \", \"answers\": [\"x\"]}\n";
        let mut c = Collector::new(&f, "fail").unwrap();
        let err = c.jsonl("d.jsonl", text, "d").unwrap_err().to_string();
        assert!(
            err.contains("d.jsonl:2") && err.contains("not valid JSON"),
            "{err}"
        );
        let mut c = Collector::new(&f, "skip").unwrap();
        c.jsonl("d.jsonl", text, "d").unwrap();
        assert_eq!((c.out.examples.len(), c.out.skipped), (1, 3));
        let mut c = Collector::new(&f, "fail").unwrap();
        let err = c
            .jsonl(
                "d.jsonl",
                "{\"_id\": \"c\", \"context\": \"c\", \"answers\": [\"x\"]}",
                "d",
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("d.jsonl:1")
                && err.contains("`input`")
                && err.contains("dataset.fields.question"),
            "{err}"
        );
        let mut c = Collector::new(&f, "fail").unwrap();
        let err = c
            .jsonl(
                "d.jsonl",
                "{\"_id\": \"d\", \"input\": \"q\", \"context\": \"\", \"answers\": [\"x\"]}",
                "d",
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("context") && err.contains("empty"), "{err}");
        assert!(Collector::new(&f, "ignore").is_err());
    }

    #[test]
    fn field_paths_reach_nested_keys_and_list_positions() {
        let rec: Map<String, Value> = serde_json::from_str(
            r#"{"id": 7, "prompt": "Read this. Which topic came first?",
                "topics": ["ferries", "tides"], "meta": {"answer": 42, "turns": [{"text": "x"}]},
                "flat.key": "flat wins"}"#,
        )
        .unwrap();
        assert_eq!(lookup(&rec, "topics[0]"), Some(&Value::from("ferries")));
        assert_eq!(lookup(&rec, "topics[1]"), Some(&Value::from("tides")));
        assert_eq!(lookup(&rec, "topics[2]"), None);
        assert_eq!(lookup(&rec, "meta.answer"), Some(&Value::from(42)));
        assert_eq!(lookup(&rec, "meta.turns[0].text"), Some(&Value::from("x")));
        assert_eq!(lookup(&rec, "flat.key"), Some(&Value::from("flat wins")));
        assert_eq!(lookup(&rec, "meta.nothing"), None);
        assert_eq!(lookup(&rec, "topics[x]"), None);
        assert_eq!(lookup(&rec, "[0]"), None);
        // A context-only record: no question field, the prompt is the context.
        let f = Fields {
            id: Some("id".into()),
            question: None,
            context: "prompt".into(),
            answers: "topics[0]".into(),
            meta: vec!["meta.answer".into()],
            extra: [
                ("first".to_string(), "topics[0]".to_string()),
                ("all".to_string(), "topics".to_string()),
            ]
            .into(),
            group: None,
        };
        let ex = to_example(&rec, &f, "r-1").unwrap();
        assert_eq!(ex.example_id, "7");
        assert_eq!(ex.question, "");
        assert_eq!(ex.context, "Read this. Which topic came first?");
        assert_eq!(ex.answers, vec!["ferries"]);
        assert_eq!(ex.extra["first"], "ferries");
        assert_eq!(ex.extra["all"], "ferries\ntides");
        assert_eq!(ex.meta["meta.answer"], Value::from(42));
        // A number as the answer, from a nested path.
        let f2 = Fields {
            answers: "meta.answer".into(),
            ..f.clone()
        };
        assert_eq!(to_example(&rec, &f2, "r-1").unwrap().answers, vec!["42"]);
        let f3 = Fields {
            answers: "meta.missing[0]".into(),
            ..f
        };
        let err = to_example(&rec, &f3, "r-1").unwrap_err();
        assert!(
            err.contains("`meta.missing[0]`") && err.contains("dataset.fields.answers"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_ids_are_an_error_even_when_skipping() {
        let f = fields();
        let line = "{\"_id\": \"a\", \"input\": \"q\", \"context\": \"c\", \"answers\": [\"x\"]}";
        let mut c = Collector::new(&f, "skip").unwrap();
        let err = c
            .jsonl("d.jsonl", format!("{line}\n{line}\n"), "d")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("d.jsonl:2")
                && err.contains("duplicate example id `a`")
                && err.contains("d.jsonl:1"),
            "{err}"
        );
        // Without an id field, records are numbered by line.
        let mut f2 = fields();
        f2.id = None;
        let mut c = Collector::new(&f2, "fail").unwrap();
        c.jsonl("d.jsonl", format!("{line}\n{line}\n"), "d")
            .unwrap();
        assert_eq!(c.out.examples[1].example_id, "d-2");
    }

    /// LongBench v2 ships one JSON array (`data.json`): its records load one
    /// at a time, bad ones follow `on_bad_record`, and a broken array names
    /// the file.
    #[test]
    fn a_json_array_file_loads_record_by_record() {
        let f = fields();
        let rec = |id: &str| serde_json::json!({"_id": id, "input": "q", "context": "c", "answers": ["x"]});
        let text = format!(
            "\u{feff}\n [{}, {}, {{\"_id\": \"bad\"}}]",
            rec("a"),
            rec("b")
        );
        let mut c = Collector::new(&f, "skip").unwrap();
        c.jsonl("data.json", &text, "data").unwrap();
        let ids: Vec<&str> = c
            .out
            .examples
            .iter()
            .map(|e| e.example_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(c.out.skipped, 1);
        assert!(
            c.out
                .first_skip
                .as_deref()
                .unwrap()
                .starts_with("data.json:record 3"),
            "{:?}",
            c.out.first_skip
        );
        // Failing on the bad record names it; a broken array names the file.
        let mut c = Collector::new(&f, "fail").unwrap();
        let err = c.jsonl("data.json", &text, "data").unwrap_err().to_string();
        assert!(err.contains("data.json:record 3"), "{err}");
        let mut c = Collector::new(&f, "fail").unwrap();
        let err = c
            .jsonl("data.json", format!("[{}, ", rec("a")), "data")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`data.json`: not a valid JSON array"), "{err}");
    }
}
