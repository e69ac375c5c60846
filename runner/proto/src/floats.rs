//! Floats that keep NaN and ±infinity through JSON.
//!
//! JSON has no NaN or infinity, and serde_json writes them as `null`, which then fails to read
//! back as a number: one NaN metric would drop a whole event, turn a finished job's summary into
//! a crash, or make a checkpoint or a store record unreadable. Every float xlab writes as JSON
//! goes through [`json`] instead (`#[serde(with = "xlab_proto::floats::json")]`): finite values
//! stay plain numbers, and the others are the strings `"NaN"`, `"inf"` and `"-inf"` (what
//! Python's `float()` and pandas read). Reading also takes `"Infinity"`, `"-Infinity"` and, from
//! files written before, `null` (as NaN).

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// An `f64` that serializes its non-finite values as strings.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct F64(pub f64);

/// The text of a non-finite float, `None` for a finite one.
pub fn non_finite_text(v: f64) -> Option<&'static str> {
    if v.is_nan() {
        Some("NaN")
    } else if v == f64::INFINITY {
        Some("inf")
    } else if v == f64::NEG_INFINITY {
        Some("-inf")
    } else {
        None
    }
}

/// Reads the text of a non-finite float (as [`non_finite_text`] writes it, and the other usual
/// spellings), case-insensitively.
pub fn parse_non_finite(s: &str) -> Option<f64> {
    match s.trim().to_ascii_lowercase().as_str() {
        "nan" | "-nan" | "+nan" => Some(f64::NAN),
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

impl Serialize for F64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match non_finite_text(self.0) {
            Some(t) => s.serialize_str(t),
            None => s.serialize_f64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for F64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<F64, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = F64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, or \"NaN\", \"inf\" or \"-inf\"")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<F64, E> {
                Ok(F64(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<F64, E> {
                Ok(F64(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<F64, E> {
                Ok(F64(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<F64, E> {
                parse_non_finite(v).map(F64).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
            fn visit_unit<E: de::Error>(self) -> Result<F64, E> {
                Ok(F64(f64::NAN))
            }
            fn visit_none<E: de::Error>(self) -> Result<F64, E> {
                Ok(F64(f64::NAN))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value whose floats can be written through [`F64`]: `f64`, and maps, lists, options and
/// tuples of such values (integers and strings pass through).
pub trait Floats: Sized {
    type Repr: Serialize + for<'de> Deserialize<'de>;
    fn to_repr(&self) -> Self::Repr;
    fn from_repr(r: Self::Repr) -> Self;
}

impl Floats for f64 {
    type Repr = F64;
    fn to_repr(&self) -> F64 {
        F64(*self)
    }
    fn from_repr(r: F64) -> f64 {
        r.0
    }
}

impl Floats for f32 {
    type Repr = F64;
    fn to_repr(&self) -> F64 {
        F64(*self as f64)
    }
    fn from_repr(r: F64) -> f32 {
        r.0 as f32
    }
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl Floats for $t {
            type Repr = $t;
            fn to_repr(&self) -> $t {
                self.clone()
            }
            fn from_repr(r: $t) -> $t {
                r
            }
        }
    )*};
}
plain!(u32, u64, usize, String);

impl<T: Floats> Floats for Vec<T> {
    type Repr = Vec<T::Repr>;
    fn to_repr(&self) -> Self::Repr {
        self.iter().map(T::to_repr).collect()
    }
    fn from_repr(r: Self::Repr) -> Self {
        r.into_iter().map(T::from_repr).collect()
    }
}

impl<T: Floats> Floats for Option<T> {
    type Repr = Option<T::Repr>;
    fn to_repr(&self) -> Self::Repr {
        self.as_ref().map(T::to_repr)
    }
    fn from_repr(r: Self::Repr) -> Self {
        r.map(T::from_repr)
    }
}

impl<K: Ord + Clone + Serialize + for<'de> Deserialize<'de>, V: Floats> Floats for BTreeMap<K, V> {
    type Repr = BTreeMap<K, V::Repr>;
    fn to_repr(&self) -> Self::Repr {
        self.iter().map(|(k, v)| (k.clone(), v.to_repr())).collect()
    }
    fn from_repr(r: Self::Repr) -> Self {
        r.into_iter().map(|(k, v)| (k, V::from_repr(v))).collect()
    }
}

impl<A: Floats, B: Floats> Floats for (A, B) {
    type Repr = (A::Repr, B::Repr);
    fn to_repr(&self) -> Self::Repr {
        (self.0.to_repr(), self.1.to_repr())
    }
    fn from_repr(r: Self::Repr) -> Self {
        (A::from_repr(r.0), B::from_repr(r.1))
    }
}

impl<A: Floats, B: Floats, C: Floats> Floats for (A, B, C) {
    type Repr = (A::Repr, B::Repr, C::Repr);
    fn to_repr(&self) -> Self::Repr {
        (self.0.to_repr(), self.1.to_repr(), self.2.to_repr())
    }
    fn from_repr(r: Self::Repr) -> Self {
        (A::from_repr(r.0), B::from_repr(r.1), C::from_repr(r.2))
    }
}

/// `#[serde(with = "xlab_proto::floats::json")]` for any [`Floats`] field.
pub mod json {
    use super::Floats;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Floats, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.to_repr().serialize(s)
    }

    pub fn deserialize<'de, T: Floats, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        T::Repr::deserialize(d).map(T::from_repr)
    }
}

/// A JSON number for a finite value, else the string [`non_finite_text`] gives (for writing
/// `serde_json::Value`s by hand).
pub fn to_json(v: f64) -> serde_json::Value {
    match non_finite_text(v) {
        Some(t) => serde_json::Value::String(t.into()),
        None => serde_json::json!(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Record {
        #[serde(with = "json")]
        summary: BTreeMap<String, f64>,
        #[serde(with = "json")]
        history: Vec<(u64, BTreeMap<String, f64>)>,
        #[serde(with = "json")]
        one: f64,
    }

    fn same(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn non_finite_values_round_trip() {
        let values = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, 1.5e-300, f64::MAX, -2.25];
        for v in values {
            let r = Record {
                summary: [("a".to_string(), v)].into(),
                history: vec![(3, [("b".to_string(), v)].into())],
                one: v,
            };
            let text = serde_json::to_string(&r).unwrap();
            assert!(!text.contains("null"), "{text}");
            let back: Record = serde_json::from_str(&text).unwrap();
            assert!(same(back.one, v) && same(back.summary["a"], v) && same(back.history[0].1["b"], v), "{text}");
        }
        let r = Record { summary: [("a".into(), f64::NAN)].into(), history: vec![], one: f64::NEG_INFINITY };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"summary":{"a":"NaN"},"history":[],"one":"-inf"}"#);
    }

    #[test]
    fn older_nulls_and_other_spellings_read() {
        let r: Record = serde_json::from_str(
            r#"{"summary":{"a":null,"b":"Infinity","c":2},"history":[[1,{"x":"-Infinity"}]],"one":"nan"}"#,
        )
        .unwrap();
        assert!(r.summary["a"].is_nan() && r.one.is_nan());
        assert_eq!((r.summary["b"], r.summary["c"], r.history[0].1["x"]), (f64::INFINITY, 2.0, f64::NEG_INFINITY));
        assert!(serde_json::from_str::<Record>(r#"{"summary":{"a":"fast"},"history":[],"one":1}"#).is_err());
    }
}
