//! Opaque JSON values and the wire codec shared by every record type.
//!
//! Records are written as the Python side writes them and read back
//! leniently. Two properties matter for wire compatibility:
//!
//! * Values Nodepool does not interpret (`requestor_data`, `user_data`,
//!   `driver_data`, ...) are kept as the exact JSON text that was read
//!   ([`Json`]), so a 128-bit trace id written by Zuul is returned to Zuul
//!   byte for byte instead of being rounded through a float.
//! * Keys this implementation does not know (Zuul adds `id`, newer versions
//!   add others) are kept in an `extra` map and written back after the known
//!   keys, so a read-modify-write never drops another writer's data.

use std::fmt;

use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// A JSON value kept as its exact source text.
///
/// Comparing two `Json` values compares their text, which is what
/// "came back exactly" means for opaque data.
#[derive(Clone)]
pub struct Json(Box<RawValue>);

impl Json {
    /// Encodes any serialisable value.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Self {
        // Serialising plain data into a string cannot fail for the types we
        // pass (maps with string keys, numbers, strings).
        match serde_json::value::to_raw_value(value) {
            Ok(raw) => Json(raw),
            Err(_) => Json::null(),
        }
    }

    /// Parses JSON text, keeping it verbatim.
    pub fn from_text(text: &str) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text.to_owned()).map(Json)
    }

    /// The JSON `null`.
    pub fn null() -> Self {
        Json(RawValue::NULL.to_owned())
    }

    /// An empty JSON object `{}`.
    pub fn empty_object() -> Self {
        match RawValue::from_string("{}".to_owned()) {
            Ok(raw) => Json(raw),
            Err(_) => Json::null(),
        }
    }

    /// The exact JSON text.
    pub fn as_text(&self) -> &str {
        self.0.get()
    }

    /// Whether this is the JSON `null`.
    pub fn is_null(&self) -> bool {
        self.0.get().trim() == "null"
    }

    /// Decodes into a typed value (lossy for numbers that do not fit the
    /// target type; the original text is unchanged).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for Json {}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(Json)
    }
}

/// Keys of a record that this implementation does not interpret, in the
/// order they were read.
pub type Extra = IndexMap<String, Json>;

/// Why a stored record could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

impl DecodeError {
    /// A decode error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        DecodeError(message.into())
    }
}

/// A record stored as one JSON object (a znode's data, or a SQLite row).
///
/// Use [`WireRecord::from_json`] and [`WireRecord::to_json`] rather than
/// serde directly: they keep the keys other writers added.
pub trait WireRecord: Serialize + DeserializeOwned {
    /// Every key this type reads and writes itself.
    const KNOWN_KEYS: &'static [&'static str];

    /// The keys this implementation does not interpret.
    fn extra_mut(&mut self) -> &mut Extra;

    /// Decodes a record, keeping unknown keys.
    fn from_json(data: &[u8]) -> Result<Self, DecodeError> {
        decode_record(data)
    }

    /// Encodes a record: known keys first, then the preserved unknown ones.
    fn to_json(&self) -> Vec<u8> {
        // Records are maps of strings, numbers and raw JSON; none of which
        // can fail to serialise.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// [`WireRecord::from_json`]'s decoding, for records that override it and
/// fall back to it.
pub(crate) fn decode_record<T: WireRecord>(data: &[u8]) -> Result<T, DecodeError> {
    if data.is_empty() {
        return Err(DecodeError::new("empty record"));
    }
    let mut record: T =
        serde_json::from_slice(data).map_err(|e| DecodeError::new(e.to_string()))?;
    let all: IndexMap<String, &RawValue> =
        serde_json::from_slice(data).map_err(|e| DecodeError::new(e.to_string()))?;
    let extra = record.extra_mut();
    for (key, value) in all {
        if !T::KNOWN_KEYS.contains(&key.as_str()) {
            extra.insert(key, Json(value.to_owned()));
        }
    }
    Ok(record)
}

/// Serde helpers for lenient reading of fields other writers may fill
/// loosely.
pub(crate) mod lenient {
    use serde::{Deserialize, Deserializer};

    /// `null` or a missing key reads as the type's default.
    pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// A list of strings, or a single string (legacy node `type`).
    pub fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Option::<OneOrMany>::deserialize(d)? {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        })
    }

    /// Nodepool coerces `hold_expiration` to an int on read; a value that is
    /// not a number means "no expiry" (0).
    pub fn coerce_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let value = Option::<serde_json::Value>::deserialize(d)?;
        Ok(match value {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(
                n.as_i64()
                    .or_else(|| n.as_f64().map(|f| f as i64))
                    .unwrap_or(0),
            ),
            Some(serde_json::Value::String(s)) => Some(
                s.trim()
                    .parse::<i64>()
                    .ok()
                    .or_else(|| s.trim().parse::<f64>().ok().map(|f| f as i64))
                    .unwrap_or(0),
            ),
            Some(_) => Some(0),
        })
    }

    /// An optional float that may also be written as a string or an int.
    pub fn float_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        let value = Option::<serde_json::Value>::deserialize(d)?;
        Ok(match value {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        })
    }

    /// A float that defaults to 0 when absent or not a number.
    pub fn float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(float_opt(d)?.unwrap_or(0.0))
    }
}
