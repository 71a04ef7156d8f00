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
use serde_json::Value;
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
    use cells::Cell;
    let mut cols = cells::Columns::default();
    for r in rows {
        cols.push_row(r)?;
    }
    // Columns in name order (as a JSON object's keys sort).
    let mut order: Vec<usize> = (0..cols.names.len()).collect();
    order.sort_by(|&a, &b| cols.names[a].cmp(&cols.names[b]));
    let kind = |c: &Cell| match c {
        Cell::Null => Kind::Null,
        Cell::Bool(_) => Kind::Bool,
        Cell::Int(_) => Kind::Int,
        Cell::Float(_) => Kind::Float,
        Cell::Str(_) => Kind::Str,
        Cell::Json(_) => Kind::Json,
    };
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for c in order {
        let (name, column) = (&cols.names[c], &cols.cells[c]);
        let kind = column.iter().fold(Kind::Null, |k, v| merge(k, kind(v)));
        let (dt, col): (DataType, ArrayRef) = match kind {
            Kind::Bool => (
                DataType::Boolean,
                Arc::new(
                    column
                        .iter()
                        .map(|v| match v {
                            Cell::Bool(b) => Some(*b),
                            _ => None,
                        })
                        .collect::<BooleanArray>(),
                ),
            ),
            Kind::Int => (
                DataType::Int64,
                Arc::new(
                    column
                        .iter()
                        .map(|v| match v {
                            Cell::Int(i) => Some(*i),
                            _ => None,
                        })
                        .collect::<Int64Array>(),
                ),
            ),
            Kind::Float => (
                DataType::Float64,
                Arc::new(
                    column
                        .iter()
                        .map(|v| match v {
                            Cell::Int(i) => Some(*i as f64),
                            Cell::Float(f) => Some(*f),
                            _ => None,
                        })
                        .collect::<Float64Array>(),
                ),
            ),
            Kind::Str | Kind::Null => (
                DataType::Utf8,
                Arc::new(
                    column
                        .iter()
                        .map(|v| match v {
                            Cell::Str(s) => Some(s.as_str()),
                            _ => None,
                        })
                        .collect::<StringArray>(),
                ),
            ),
            Kind::Json => (
                DataType::Utf8,
                Arc::new(
                    column
                        .iter()
                        .map(|v| match v {
                            Cell::Null => None,
                            Cell::Bool(b) => Some(b.to_string()),
                            Cell::Int(i) => Some(i.to_string()),
                            Cell::Float(f) => Some(Value::from(*f).to_string()),
                            Cell::Str(s) => Some(Value::from(s.as_str()).to_string()),
                            Cell::Json(j) => Some(j.clone()),
                        })
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
        arrays.push(col);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = if arrays.is_empty() {
        RecordBatch::new_empty(schema.clone())
    } else {
        RecordBatch::try_new(schema.clone(), arrays)?
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
    read_bytes(bytes::Bytes::copy_from_slice(bytes))
}

/// [`read`] for bytes the caller is done with (no copy of the file).
pub fn read_owned<T: DeserializeOwned>(bytes: Vec<u8>) -> Result<Vec<T>> {
    read_bytes(bytes::Bytes::from(bytes))
}

fn read_bytes<T: DeserializeOwned>(bytes: bytes::Bytes) -> Result<Vec<T>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).context("not a Parquet table")?;
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

/// Rows serialized straight into columns: no JSON map per row. A row is a
/// struct or a map (a struct with flattened parts serializes as one); each
/// field becomes a cell, and anything nested (a list, a map, a struct) is
/// stored as its JSON text.
mod cells {
    use serde::ser::{self, Impossible, Serialize};

    /// One value as a row holds it, typed as `serde_json::to_value` would
    /// type it (integers that fit i64 are `Int`, non-finite floats null).
    pub enum Cell {
        Null,
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(String),
        Json(String),
    }

    #[derive(Debug)]
    pub enum Error {
        /// A list, map or struct: stored as JSON instead.
        Nested,
        Msg(String),
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Error::Nested => write!(f, "a nested value"),
                Error::Msg(m) => write!(f, "{m}"),
            }
        }
    }
    impl std::error::Error for Error {}
    impl ser::Error for Error {
        fn custom<T: std::fmt::Display>(msg: T) -> Self {
            Error::Msg(msg.to_string())
        }
    }

    /// The columns so far: names in first-seen order, one cell per row each.
    #[derive(Default)]
    pub struct Columns {
        pub names: Vec<String>,
        pub cells: Vec<Vec<Cell>>,
        /// Column of each position in the previous row: rows of one struct
        /// have the same fields in the same order.
        prev: Vec<usize>,
        pub rows: usize,
    }

    impl Columns {
        pub fn push_row<T: Serialize + ?Sized>(&mut self, row: &T) -> anyhow::Result<()> {
            row.serialize(RowSer { cols: self, pos: 0 })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            self.rows += 1;
            // A column this row lacks holds null for it.
            let rows = self.rows;
            for col in self.cells.iter_mut().filter(|c| c.len() < rows) {
                col.push(Cell::Null);
            }
            Ok(())
        }

        fn column(&mut self, pos: usize, name: &str) -> usize {
            if let Some(&c) = self.prev.get(pos) {
                if self.names[c] == name {
                    return c;
                }
            }
            let c = match self.names.iter().position(|n| n == name) {
                Some(c) => c,
                None => {
                    self.names.push(name.to_string());
                    self.cells
                        .push((0..self.rows).map(|_| Cell::Null).collect());
                    self.names.len() - 1
                }
            };
            if pos < self.prev.len() {
                self.prev[pos] = c;
            } else {
                self.prev.push(c);
            }
            c
        }

        fn put<T: Serialize + ?Sized>(
            &mut self,
            pos: usize,
            name: &str,
            value: &T,
        ) -> Result<(), Error> {
            let cell = match value.serialize(CellSer) {
                Ok(cell) => cell,
                Err(Error::Nested) => {
                    Cell::Json(serde_json::to_string(value).map_err(|e| Error::Msg(e.to_string()))?)
                }
                Err(e) => return Err(e),
            };
            let c = self.column(pos, name);
            let col = &mut self.cells[c];
            if col.len() > self.rows {
                // The same key twice in one row: the last one stands.
                *col.last_mut().expect("a cell") = cell;
            } else {
                col.push(cell);
            }
            Ok(())
        }
    }

    fn not_a_row() -> Error {
        Error::Msg("a table row must be a struct or a map".into())
    }

    struct RowSer<'a> {
        cols: &'a mut Columns,
        pos: usize,
    }

    /// A map row's next key, kept until its value arrives.
    struct MapRow<'a> {
        row: RowSer<'a>,
        key: String,
    }

    /// Serializer methods that refuse their value with `$err`.
    macro_rules! refuse {
        ($err:expr; $($f:ident($($t:ty),*) -> $r:ty),* $(,)?) => {
            $(fn $f(self, $(_: $t),*) -> Result<$r, Error> { Err($err) })*
        };
    }

    impl<'a> ser::Serializer for RowSer<'a> {
        type Ok = ();
        type Error = Error;
        type SerializeSeq = Impossible<(), Error>;
        type SerializeTuple = Impossible<(), Error>;
        type SerializeTupleStruct = Impossible<(), Error>;
        type SerializeTupleVariant = Impossible<(), Error>;
        type SerializeMap = MapRow<'a>;
        type SerializeStruct = RowSer<'a>;
        type SerializeStructVariant = Impossible<(), Error>;

        fn serialize_struct(self, _: &'static str, _: usize) -> Result<RowSer<'a>, Error> {
            Ok(self)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<MapRow<'a>, Error> {
            Ok(MapRow {
                row: self,
                key: String::new(),
            })
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            v: &T,
        ) -> Result<(), Error> {
            v.serialize(self)
        }
        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Error> {
            Err(not_a_row())
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<(), Error> {
            Err(not_a_row())
        }
        refuse!(not_a_row();
            serialize_bool(bool) -> (),
            serialize_i8(i8) -> (),
            serialize_i16(i16) -> (),
            serialize_i32(i32) -> (),
            serialize_i64(i64) -> (),
            serialize_u8(u8) -> (),
            serialize_u16(u16) -> (),
            serialize_u32(u32) -> (),
            serialize_u64(u64) -> (),
            serialize_f32(f32) -> (),
            serialize_f64(f64) -> (),
            serialize_char(char) -> (),
            serialize_str(&str) -> (),
            serialize_bytes(&[u8]) -> (),
            serialize_none() -> (),
            serialize_unit() -> (),
            serialize_unit_struct(&'static str) -> (),
            serialize_unit_variant(&'static str, u32, &'static str) -> (),
            serialize_seq(Option<usize>) -> Self::SerializeSeq,
            serialize_tuple(usize) -> Self::SerializeTuple,
            serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct,
            serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Self::SerializeTupleVariant,
            serialize_struct_variant(&'static str, u32, &'static str, usize) -> Self::SerializeStructVariant,
        );
    }

    impl ser::SerializeStruct for RowSer<'_> {
        type Ok = ();
        type Error = Error;
        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            key: &'static str,
            value: &T,
        ) -> Result<(), Error> {
            self.cols.put(self.pos, key, value)?;
            self.pos += 1;
            Ok(())
        }
        fn end(self) -> Result<(), Error> {
            Ok(())
        }
    }

    impl ser::SerializeMap for MapRow<'_> {
        type Ok = ();
        type Error = Error;
        fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
            self.key.clear();
            match key.serialize(CellSer)? {
                Cell::Str(s) => self.key = s,
                Cell::Int(i) => self.key = i.to_string(),
                _ => return Err(Error::Msg("a map key must be a string".into())),
            }
            Ok(())
        }
        fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
            let key = std::mem::take(&mut self.key);
            self.row.cols.put(self.row.pos, &key, value)?;
            self.row.pos += 1;
            Ok(())
        }
        fn end(self) -> Result<(), Error> {
            Ok(())
        }
    }

    /// One field's value as a cell; `Err(Nested)` for anything that is not a scalar.
    struct CellSer;

    /// Integer serializers: a cell holding the value as i64.
    macro_rules! ints {
        ($($f:ident($t:ty)),* $(,)?) => {
            $(fn $f(self, v: $t) -> Result<Cell, Error> { Ok(Cell::Int(v.into())) })*
        };
    }

    impl ser::Serializer for CellSer {
        type Ok = Cell;
        type Error = Error;
        type SerializeSeq = Impossible<Cell, Error>;
        type SerializeTuple = Impossible<Cell, Error>;
        type SerializeTupleStruct = Impossible<Cell, Error>;
        type SerializeTupleVariant = Impossible<Cell, Error>;
        type SerializeMap = Impossible<Cell, Error>;
        type SerializeStruct = Impossible<Cell, Error>;
        type SerializeStructVariant = Impossible<Cell, Error>;

        fn serialize_bool(self, v: bool) -> Result<Cell, Error> {
            Ok(Cell::Bool(v))
        }
        ints!(
            serialize_i8(i8),
            serialize_i16(i16),
            serialize_i32(i32),
            serialize_i64(i64),
            serialize_u8(u8),
            serialize_u16(u16),
            serialize_u32(u32),
        );
        fn serialize_u64(self, v: u64) -> Result<Cell, Error> {
            Ok(i64::try_from(v).map_or(Cell::Float(v as f64), Cell::Int))
        }
        fn serialize_f32(self, v: f32) -> Result<Cell, Error> {
            self.serialize_f64(v.into())
        }
        fn serialize_f64(self, v: f64) -> Result<Cell, Error> {
            Ok(if v.is_finite() {
                Cell::Float(v)
            } else {
                Cell::Null
            })
        }
        fn serialize_char(self, v: char) -> Result<Cell, Error> {
            Ok(Cell::Str(v.to_string()))
        }
        fn serialize_str(self, v: &str) -> Result<Cell, Error> {
            Ok(Cell::Str(v.to_string()))
        }
        fn serialize_none(self) -> Result<Cell, Error> {
            Ok(Cell::Null)
        }
        fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<Cell, Error> {
            v.serialize(self)
        }
        fn serialize_unit(self) -> Result<Cell, Error> {
            Ok(Cell::Null)
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<Cell, Error> {
            Ok(Cell::Null)
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
        ) -> Result<Cell, Error> {
            Ok(Cell::Str(variant.to_string()))
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            v: &T,
        ) -> Result<Cell, Error> {
            v.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<Cell, Error> {
            Err(Error::Nested)
        }
        refuse!(Error::Nested;
            serialize_bytes(&[u8]) -> Cell,
            serialize_seq(Option<usize>) -> Self::SerializeSeq,
            serialize_tuple(usize) -> Self::SerializeTuple,
            serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct,
            serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Self::SerializeTupleVariant,
            serialize_map(Option<usize>) -> Self::SerializeMap,
            serialize_struct(&'static str, usize) -> Self::SerializeStruct,
            serialize_struct_variant(&'static str, u32, &'static str, usize) -> Self::SerializeStructVariant,
        );
    }
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
    use serde_json::Map;

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
    fn rows_read_back_as_their_json_values() {
        // Flattened parts, options, nested values, a unit variant, a newtype,
        // a non-finite float and a u64 past i64: each cell reads back as
        // `serde_json::to_value` makes it.
        #[derive(Serialize)]
        enum Mode {
            Fast,
        }
        #[derive(Serialize)]
        struct Inner {
            text: String,
            n: Option<u64>,
            per_layer: Option<Vec<u64>>,
        }
        #[derive(Serialize)]
        struct Id(String);
        #[derive(Serialize)]
        struct Outer {
            id: Id,
            mode: Mode,
            score: f64,
            big: u64,
            #[serde(flatten)]
            inner: Inner,
        }
        let rows = vec![
            Outer {
                id: Id("a".into()),
                mode: Mode::Fast,
                score: 0.5,
                big: 7,
                inner: Inner {
                    text: "x \"y\"".into(),
                    n: Some(3),
                    per_layer: Some(vec![1, 2]),
                },
            },
            Outer {
                id: Id("b".into()),
                mode: Mode::Fast,
                score: f64::NAN,
                big: 9,
                inner: Inner {
                    text: String::new(),
                    n: None,
                    per_layer: None,
                },
            },
        ];
        let back: Vec<Map<String, Value>> = read(&write(&rows).unwrap()).unwrap();
        for (r, b) in rows.iter().zip(&back) {
            let Value::Object(want) = serde_json::to_value(r).unwrap() else {
                unreachable!()
            };
            assert_eq!(b, &want);
        }
        // Past i64, an integer is stored as a float, as `to_value` types it.
        let big: Vec<Value> = vec![serde_json::json!({"n": u64::MAX})];
        let back: Vec<Map<String, Value>> = read(&write(&big).unwrap()).unwrap();
        assert_eq!(back[0]["n"], serde_json::json!(u64::MAX as f64));
        assert!(write(&[1, 2]).is_err(), "a row must be a struct or a map");
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
