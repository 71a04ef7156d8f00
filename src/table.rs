//! Row tables as Parquet artifacts. Stages work with serde structs; this module
//! turns a list of rows into one Parquet file and back. Column types are taken
//! from the rows: strings, integers, floats and booleans map to Arrow columns
//! (nullable), anything nested (lists, maps) is stored as a JSON string and
//! marked in the field metadata so it reads back as the same value. Output
//! bytes depend only on the rows: no timestamps, a fixed writer name.

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

const JSON_KEY: &str = "kvt.json";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Null,
    Bool,
    Int,
    Float,
    Str,
    Json,
}

fn kind_of(v: &Value) -> Kind {
    match v {
        Value::Null => Kind::Null,
        Value::Bool(_) => Kind::Bool,
        Value::Number(n) if n.is_i64() => Kind::Int,
        Value::Number(_) => Kind::Float,
        Value::String(_) => Kind::Str,
        _ => Kind::Json,
    }
}

fn merge(a: Kind, b: Kind) -> Kind {
    use Kind::*;
    match (a, b) {
        (x, Null) | (Null, x) => x,
        (x, y) if x == y => x,
        (Int, Float) | (Float, Int) => Float,
        _ => Json,
    }
}

/// Encodes rows (serde structs that serialize to JSON objects) as Parquet.
pub fn write<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let rows: Vec<Map<String, Value>> = rows
        .iter()
        .map(|r| match serde_json::to_value(r)? {
            Value::Object(m) => Ok(m),
            other => bail!("a table row must be an object, got {other}"),
        })
        .collect::<Result<_>>()?;
    write_maps(&rows)
}

fn write_maps(rows: &[Map<String, Value>]) -> Result<Vec<u8>> {
    // Column order: first appearance (serde field order), then stable.
    let mut names: Vec<String> = Vec::new();
    let mut kinds: HashMap<String, Kind> = HashMap::new();
    for r in rows {
        for (k, v) in r {
            match kinds.get_mut(k) {
                Some(kind) => *kind = merge(*kind, kind_of(v)),
                None => {
                    names.push(k.clone());
                    kinds.insert(k.clone(), kind_of(v));
                }
            }
        }
    }
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for name in &names {
        let kind = kinds[name];
        let vals = rows.iter().map(|r| r.get(name).unwrap_or(&Value::Null));
        let (dt, col): (DataType, ArrayRef) = match kind {
            Kind::Bool => (
                DataType::Boolean,
                Arc::new(vals.map(Value::as_bool).collect::<BooleanArray>()),
            ),
            Kind::Int => (
                DataType::Int64,
                Arc::new(vals.map(Value::as_i64).collect::<Int64Array>()),
            ),
            Kind::Float => (
                DataType::Float64,
                Arc::new(vals.map(Value::as_f64).collect::<Float64Array>()),
            ),
            Kind::Str | Kind::Null => (
                DataType::Utf8,
                Arc::new(
                    vals.map(|v| v.as_str().map(str::to_string))
                        .collect::<StringArray>(),
                ),
            ),
            Kind::Json => (
                DataType::Utf8,
                Arc::new(
                    vals.map(|v| (!v.is_null()).then(|| v.to_string()))
                        .collect::<StringArray>(),
                ),
            ),
        };
        let mut f = Field::new(name, dt, true);
        if kind == Kind::Json {
            f = f.with_metadata(
                [(JSON_KEY.to_string(), "1".to_string())]
                    .into_iter()
                    .collect::<HashMap<String, String>>(),
            );
        }
        fields.push(f);
        cols.push(col);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = if cols.is_empty() {
        RecordBatch::new_empty(schema.clone())
    } else {
        RecordBatch::try_new(schema.clone(), cols)?
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by("kvt".to_string())
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, Some(props))?;
    if batch.num_rows() > 0 {
        w.write(&batch)?;
    }
    w.close()?;
    Ok(buf)
}

/// Decodes a Parquet file written by [`write`] into rows.
pub fn read<T: DeserializeOwned>(bytes: &[u8]) -> Result<Vec<T>> {
    read_maps(bytes)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::from_value(Value::Object(m))
                .with_context(|| format!("table row {i} has an unexpected shape"))
        })
        .collect()
}

fn read_maps(bytes: &[u8]) -> Result<Vec<Map<String, Value>>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))
        .context("not a Parquet table")?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let schema = batch.schema();
        let n = batch.num_rows();
        let start = out.len();
        out.extend((0..n).map(|_| Map::new()));
        for (ci, field) in schema.fields().iter().enumerate() {
            let col = batch.column(ci);
            let is_json = field.metadata().contains_key(JSON_KEY);
            for i in 0..n {
                let v = if col.is_null(i) {
                    Value::Null
                } else {
                    match field.data_type() {
                        DataType::Boolean => Value::Bool(downcast::<BooleanArray>(col)?.value(i)),
                        DataType::Int64 => Value::from(downcast::<Int64Array>(col)?.value(i)),
                        DataType::Float64 => Value::from(downcast::<Float64Array>(col)?.value(i)),
                        DataType::Utf8 => {
                            let s = downcast::<StringArray>(col)?.value(i);
                            if is_json {
                                serde_json::from_str(s)?
                            } else {
                                Value::String(s.to_string())
                            }
                        }
                        other => bail!("column `{}` has unsupported type {other}", field.name()),
                    }
                };
                out[start + i].insert(field.name().clone(), v);
            }
        }
    }
    Ok(out)
}

fn downcast<A: 'static>(col: &ArrayRef) -> Result<&A> {
    col.as_any()
        .downcast_ref::<A>()
        .ok_or_else(|| anyhow!("column has an unexpected Arrow type"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Row {
        id: String,
        n: i64,
        x: Option<f64>,
        ok: bool,
        tags: Vec<String>,
        meta: Map<String, Value>,
    }

    #[test]
    fn rows_round_trip_and_bytes_are_deterministic() {
        let rows = vec![
            Row {
                id: "a".into(),
                n: 1,
                x: Some(0.5),
                ok: true,
                tags: vec!["p".into()],
                meta: [("depth".to_string(), Value::from(0.25))]
                    .into_iter()
                    .collect(),
            },
            Row {
                id: "b".into(),
                n: -3,
                x: None,
                ok: false,
                tags: vec![],
                meta: Map::new(),
            },
        ];
        let bytes = write(&rows).unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        assert_eq!(bytes, write(&rows).unwrap());
        let back: Vec<Row> = read(&bytes).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn empty_table_round_trips() {
        let rows: Vec<Row> = vec![];
        let back: Vec<Row> = read(&write(&rows).unwrap()).unwrap();
        assert!(back.is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(read::<Row>(b"not parquet").is_err());
    }
}
