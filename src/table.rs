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
    // Each row's values are sorted into columns once: rows of one struct
    // have the same keys in the same order, so a key is first checked
    // against the previous row's key at its position.
    static NULL: Value = Value::Null;
    let mut names: Vec<&str> = Vec::new();
    let mut kinds: Vec<Kind> = Vec::new();
    let mut values: Vec<Vec<&Value>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut prev: Vec<(&str, usize)> = Vec::new();
    for (ri, r) in rows.iter().enumerate() {
        for (pos, (k, v)) in r.iter().enumerate() {
            let c = match prev.get(pos) {
                Some(&(pk, c)) if pk == k.as_str() => c,
                _ => {
                    let c = *index.entry(k.as_str()).or_insert_with(|| {
                        names.push(k.as_str());
                        kinds.push(kind_of(v));
                        values.push(vec![&NULL; ri]);
                        names.len() - 1
                    });
                    if pos < prev.len() {
                        prev[pos] = (k.as_str(), c);
                    } else {
                        prev.push((k.as_str(), c));
                    }
                    c
                }
            };
            kinds[c] = merge(kinds[c], kind_of(v));
            values[c].push(v);
        }
        // A column this row lacks holds null for it.
        for col in values.iter_mut().filter(|col| col.len() == ri) {
            col.push(&NULL);
        }
    }
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for ((name, &kind), column) in names.iter().zip(&kinds).zip(&values) {
        let vals = column.iter().copied();
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
        let mut f = Field::new(*name, dt, true);
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

/// The field names of `T` when it deserializes as a plain struct (`None`
/// for maps, structs with flattened parts and everything else).
pub fn struct_fields<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    use serde::de::{Deserializer, Visitor};
    use std::cell::Cell;
    struct Probe<'a>(&'a Cell<Option<&'static [&'static str]>>);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a plain struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.set(Some(fields));
            Err(serde::de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let seen = Cell::new(None);
    let _ = T::deserialize(Probe(&seen));
    seen.get()
}

/// Decodes a Parquet file written by [`write`] into rows. When `T` is a
/// plain struct only its columns are decoded, so a narrow view of a wide
/// table (the analysis's view of the score rows) skips the rest.
pub fn read<T: DeserializeOwned>(bytes: &[u8]) -> Result<Vec<T>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))
        .context("not a Parquet table")?;
    let builder = match struct_fields::<T>() {
        // Every row still needs a column to count it by.
        Some(fields)
            if builder
                .schema()
                .fields()
                .iter()
                .any(|f| fields.contains(&f.name().as_str())) =>
        {
            let roots: Vec<usize> = builder
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| fields.contains(&f.name().as_str()))
                .map(|(i, _)| i)
                .collect();
            let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
            builder.with_projection(mask)
        }
        _ => builder,
    };
    let reader = builder.build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let schema = batch.schema();
        let cols = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, col)| {
                let values = match field.data_type() {
                    DataType::Boolean => Cells::Bool(downcast::<BooleanArray>(col)?),
                    DataType::Int64 => Cells::Int(downcast::<Int64Array>(col)?),
                    DataType::Float64 => Cells::Float(downcast::<Float64Array>(col)?),
                    DataType::Utf8 if field.metadata().contains_key(JSON_KEY) => {
                        Cells::Json(downcast::<StringArray>(col)?)
                    }
                    DataType::Utf8 => Cells::Str(downcast::<StringArray>(col)?),
                    other => bail!("column `{}` has unsupported type {other}", field.name()),
                };
                Ok(Column {
                    name: field.name().as_str(),
                    nulls: col.as_ref(),
                    values,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for row in 0..batch.num_rows() {
            let start = out.len();
            out.push(
                T::deserialize(rows::Row { cols: &cols, row })
                    .with_context(|| format!("table row {start} has an unexpected shape"))?,
            );
        }
    }
    Ok(out)
}

/// One column's values, typed once per batch.
enum Cells<'a> {
    Bool(&'a BooleanArray),
    Int(&'a Int64Array),
    Float(&'a Float64Array),
    Str(&'a StringArray),
    /// Nested values stored as JSON text.
    Json(&'a StringArray),
}

struct Column<'a> {
    name: &'a str,
    nulls: &'a dyn Array,
    values: Cells<'a>,
}

/// Rows deserialized straight from the Arrow columns: no map or JSON value
/// per row (reading 100,000 score rows was mostly allocation before).
mod rows {
    use super::{Cells, Column};
    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
    use serde::forward_to_deserialize_any;

    type Error = serde_json::Error;

    pub struct Row<'c, 'a> {
        pub cols: &'c [Column<'a>],
        pub row: usize,
    }

    impl<'de> de::Deserializer<'de> for Row<'_, '_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            v.visit_map(Fields {
                cols: self.cols,
                row: self.row,
                next: 0,
            })
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct enum identifier ignored_any
        }
    }

    struct Fields<'c, 'a> {
        cols: &'c [Column<'a>],
        row: usize,
        next: usize,
    }

    impl<'de> MapAccess<'de> for Fields<'_, '_> {
        type Error = Error;
        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            match self.cols.get(self.next) {
                Some(c) => seed.deserialize(c.name.into_deserializer()).map(Some),
                None => Ok(None),
            }
        }
        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            let col = &self.cols[self.next];
            self.next += 1;
            seed.deserialize(Cell { col, row: self.row })
        }
    }

    struct Cell<'c, 'a> {
        col: &'c Column<'a>,
        row: usize,
    }

    impl Cell<'_, '_> {
        fn is_null(&self) -> bool {
            self.col.nulls.is_null(self.row)
        }
    }

    impl<'de> de::Deserializer<'de> for Cell<'_, '_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            if self.is_null() {
                return v.visit_unit();
            }
            let i = self.row;
            match &self.col.values {
                Cells::Bool(a) => v.visit_bool(a.value(i)),
                Cells::Int(a) => v.visit_i64(a.value(i)),
                Cells::Float(a) => v.visit_f64(a.value(i)),
                Cells::Str(a) => v.visit_str(a.value(i)),
                Cells::Json(a) => {
                    let value: serde_json::Value = serde_json::from_str(a.value(i))?;
                    de::Deserializer::deserialize_any(value, v)
                }
            }
        }
        fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            if self.is_null() {
                v.visit_none()
            } else {
                v.visit_some(self)
            }
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, Error> {
            match &self.col.values {
                Cells::Str(a) if !self.is_null() => {
                    let s: &str = a.value(self.row);
                    let d: de::value::StrDeserializer<'_, Error> = s.into_deserializer();
                    de::Deserializer::deserialize_enum(d, name, variants, v)
                }
                Cells::Json(a) if !self.is_null() => {
                    let value: serde_json::Value = serde_json::from_str(a.value(self.row))?;
                    de::Deserializer::deserialize_enum(value, name, variants, v)
                }
                _ => self.deserialize_any(v),
            }
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf unit unit_struct newtype_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }
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
    fn a_narrow_view_decodes_only_its_columns_and_reads_the_same_values() {
        #[derive(Debug, PartialEq, Deserialize)]
        struct Narrow {
            id: String,
            x: Option<f64>,
        }
        #[derive(Debug, Deserialize)]
        struct Flat {
            #[allow(dead_code)]
            id: String,
            #[serde(flatten)]
            #[allow(dead_code)]
            rest: Map<String, Value>,
        }
        assert_eq!(
            struct_fields::<Row>(),
            Some(&["id", "n", "x", "ok", "tags", "meta"][..])
        );
        assert_eq!(struct_fields::<Narrow>(), Some(&["id", "x"][..]));
        assert_eq!(struct_fields::<Flat>(), None);
        assert_eq!(struct_fields::<Map<String, Value>>(), None);
        let rows: Vec<Row> = (0..3)
            .map(|i| Row {
                id: format!("r{i}"),
                n: i,
                x: (i != 1).then_some(i as f64 / 2.0),
                ok: i % 2 == 0,
                tags: vec!["a".into(); i as usize],
                meta: Map::new(),
            })
            .collect();
        let bytes = write(&rows).unwrap();
        let narrow: Vec<Narrow> = read(&bytes).unwrap();
        assert_eq!(
            narrow,
            vec![
                Narrow {
                    id: "r0".into(),
                    x: Some(0.0)
                },
                Narrow {
                    id: "r1".into(),
                    x: None
                },
                Narrow {
                    id: "r2".into(),
                    x: Some(1.0)
                },
            ]
        );
        // A view that names no column of the table still counts its rows.
        #[derive(Debug, PartialEq, Deserialize)]
        struct Nothing {
            #[serde(default)]
            absent: Option<i64>,
        }
        assert_eq!(read::<Nothing>(&bytes).unwrap().len(), 3);
        // The whole row still reads back whole.
        assert_eq!(read::<Row>(&bytes).unwrap(), rows);
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
    fn rows_with_different_keys_line_up_by_name() {
        // Keys missing from some rows (skipped fields), a key only a later
        // row has, and a column that is an integer in one row and a float
        // in another.
        let rows: Vec<Value> = vec![
            serde_json::json!({"a": 1, "b": "x", "c": 1}),
            serde_json::json!({"a": 2, "c": 2.5}),
            serde_json::json!({"a": 3, "b": "z", "c": 3, "d": true}),
            serde_json::json!({"b": "w", "c": 4}),
        ];
        let back: Vec<Map<String, Value>> = read(&write(&rows).unwrap()).unwrap();
        let col = |k: &str| -> Vec<Value> {
            back.iter()
                .map(|r| r.get(k).cloned().unwrap_or(Value::Null))
                .collect()
        };
        use serde_json::json;
        assert_eq!(col("a"), [json!(1), json!(2), json!(3), Value::Null]);
        assert_eq!(col("b"), [json!("x"), Value::Null, json!("z"), json!("w")]);
        assert_eq!(col("c"), [json!(1.0), json!(2.5), json!(3.0), json!(4.0)]);
        assert_eq!(
            col("d"),
            [Value::Null, Value::Null, json!(true), Value::Null]
        );
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
