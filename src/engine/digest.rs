//! Content digests (blake3) and the canonical encoding that turns a config slice
//! into the same bytes on every run and machine.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A blake3 digest, shown and stored as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }
    pub fn hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| Digest(*h.as_bytes()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a blake3 hex digest")))
    }
}

/// Canonical bytes of a JSON value: object keys sorted, no whitespace, numbers
/// in serde_json's shortest round-trip form. `serde_json::Value` keeps objects
/// in a `BTreeMap` (the `preserve_order` feature is off), so plain serialization
/// is already canonical; this function is the one place that relies on it.
pub fn canonical_json(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a JSON value always serializes")
}

/// Length-prefixed fields for a hasher, so `("ab","c")` and `("a","bc")` differ.
pub fn hash_field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_and_is_stable() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": [1.0, 0.5]}"#).unwrap();
        let b = json!({"a": [1.0, 0.5], "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), br#"{"a":[1.0,0.5],"b":1}"#.to_vec());
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = Digest::of(b"kvt");
        assert_eq!(Digest::from_hex(&d.hex()), Some(d));
        assert_eq!(d.hex().len(), 64);
    }
}
