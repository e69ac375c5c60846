//! Typed columns from JSON values, as Arrow arrays: what the Parquet and Arrow outputs are built
//! from. A column's type is the one its values share (booleans, integers, floats, strings);
//! integers and floats together are floats; anything else mixed, or a list or map, is its JSON
//! text. Missing values are nulls; NaN and ±inf stay themselves.

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema};
use serde_json::Value;
use std::sync::Arc;

/// A column's values before their type is known.
pub enum Column {
    /// JSON values (config keys, sweep values): typed by what they hold.
    Json(Vec<Value>),
    /// Numbers, `None` where there is none (final metrics keep NaN and infinities).
    Num(Vec<Option<f64>>),
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Bool(Vec<Option<bool>>),
}

#[derive(PartialEq)]
enum Kind {
    Null,
    Bool,
    Int,
    Float,
    Text,
    Mixed,
}

fn kind_of(values: &[Value]) -> Kind {
    let mut k = Kind::Null;
    for v in values {
        let this = match v {
            Value::Null => continue,
            Value::Bool(_) => Kind::Bool,
            Value::Number(n) if n.is_i64() => Kind::Int,
            Value::Number(_) => Kind::Float,
            Value::String(_) => Kind::Text,
            Value::Array(_) | Value::Object(_) => Kind::Mixed,
        };
        k = match (k, this) {
            (Kind::Null, t) => t,
            (a, b) if a == b => a,
            (Kind::Int | Kind::Float, Kind::Int | Kind::Float) => Kind::Float,
            _ => Kind::Mixed,
        };
    }
    k
}

impl Column {
    fn array(self) -> ArrayRef {
        match self {
            Column::Json(values) => match kind_of(&values) {
                Kind::Bool => {
                    let mut b = BooleanBuilder::with_capacity(values.len());
                    values.iter().for_each(|v| b.append_option(v.as_bool()));
                    Arc::new(b.finish())
                }
                Kind::Int => {
                    let mut b = Int64Builder::with_capacity(values.len());
                    values.iter().for_each(|v| b.append_option(v.as_i64()));
                    Arc::new(b.finish())
                }
                Kind::Float => {
                    let mut b = Float64Builder::with_capacity(values.len());
                    values.iter().for_each(|v| b.append_option(v.as_f64()));
                    Arc::new(b.finish())
                }
                Kind::Text | Kind::Null | Kind::Mixed => {
                    let mut b = StringBuilder::with_capacity(values.len(), values.len() * 8);
                    for v in &values {
                        match v {
                            Value::Null => b.append_null(),
                            Value::String(s) => b.append_value(s),
                            other => b.append_value(other.to_string()),
                        }
                    }
                    Arc::new(b.finish())
                }
            },
            Column::Num(v) => Arc::new(arrow_array::Float64Array::from(v)),
            Column::Int(v) => Arc::new(arrow_array::Int64Array::from(v)),
            Column::Text(v) => Arc::new(arrow_array::StringArray::from(v)),
            Column::Bool(v) => Arc::new(arrow_array::BooleanArray::from(v)),
        }
    }
}

/// A table of named columns of equal length.
pub fn batch(columns: Vec<(String, Column)>) -> anyhow::Result<RecordBatch> {
    let (names, arrays): (Vec<String>, Vec<ArrayRef>) = columns.into_iter().map(|(n, c)| (n, c.array())).unzip();
    let fields: Vec<Field> =
        names.iter().zip(&arrays).map(|(n, a)| Field::new(n, a.data_type().clone(), true)).collect();
    if arrays.is_empty() {
        return Ok(RecordBatch::new_empty(Arc::new(Schema::new(fields))));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

/// Writes batches (of one schema) as a Parquet file.
pub fn write_parquet(out: impl std::io::Write + Send, batches: &[RecordBatch]) -> anyhow::Result<()> {
    let schema = batches.first().map(RecordBatch::schema).unwrap_or_else(|| Arc::new(Schema::empty()));
    let mut w = parquet::arrow::ArrowWriter::try_new(out, schema, None)?;
    for b in batches {
        w.write(b)?;
    }
    w.close()?;
    Ok(())
}

/// Writes batches as an Arrow IPC file (`pyarrow.ipc.open_file`, `polars.read_ipc`).
pub fn write_arrow(out: impl std::io::Write, batches: &[RecordBatch]) -> anyhow::Result<()> {
    let schema = batches.first().map(RecordBatch::schema).unwrap_or_else(|| Arc::new(Schema::empty()));
    let mut w = arrow_ipc::writer::FileWriter::try_new(out, &schema)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::DataType;
    use serde_json::json;

    #[test]
    fn columns_take_the_type_their_values_share() {
        let b = batch(vec![
            ("lr".into(), Column::Json(vec![json!(0.1), json!(1), Value::Null])),
            ("epochs".into(), Column::Json(vec![json!(3), json!(5), json!(7)])),
            ("use".into(), Column::Json(vec![json!("sam.sam"), Value::Null, json!("sam.asam")])),
            ("hidden".into(), Column::Json(vec![json!([64, 64]), json!([32]), Value::Null])),
            ("odd".into(), Column::Json(vec![json!(true), json!("x"), json!(1)])),
            ("flag".into(), Column::Json(vec![json!(true), json!(false), Value::Null])),
        ])
        .unwrap();
        let types: Vec<DataType> = b.schema().fields().iter().map(|f| f.data_type().clone()).collect();
        assert_eq!(
            types,
            [DataType::Float64, DataType::Int64, DataType::Utf8, DataType::Utf8, DataType::Utf8, DataType::Boolean]
        );
        let hidden = b.column(3).as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
        assert_eq!(hidden.value(0), "[64,64]");
        assert_eq!(b.column(0).null_count(), 1);
    }
}
