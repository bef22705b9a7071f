//! The one place YAML is read.
//!
//! YAML is parsed into a generic tree, then walked by [`Fields`], which
//! records which keys the schema asked for. Every problem is pushed onto an
//! error list with the path it was found at, so validation reports all
//! problems at once; keys nobody asked for become "unknown key" errors with
//! a did-you-mean suggestion.

use indexmap::IndexMap;
use serde_yaml::Value;

use super::error::{ConfigError, ConfigErrorKind, ConfigErrors};

/// Parses YAML text into a tree. An empty document is an empty mapping.
pub(crate) fn parse(text: &str) -> Result<Value, ConfigErrors> {
    match serde_yaml::from_str::<Value>(text) {
        Ok(Value::Null) => Ok(Value::Mapping(Default::default())),
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e
                .location()
                .map(|l| format!("line {} column {}", l.line(), l.column()))
                .unwrap_or_default();
            Err(ConfigErrors::one(ConfigError::new(
                path,
                ConfigErrorKind::Syntax,
                format!("not valid YAML: {e}"),
            )))
        }
    }
}

/// Collects errors while a document is walked.
#[derive(Default)]
pub(crate) struct Errors {
    pub list: Vec<ConfigError>,
    /// What loads anyway, for [`Config::warnings`](super::Config::warnings).
    pub warnings: Vec<ConfigError>,
}

impl Errors {
    pub fn push(&mut self, path: &str, kind: ConfigErrorKind, message: impl Into<String>) {
        self.list.push(ConfigError::new(path, kind, message));
    }

    pub fn warn(&mut self, path: &str, kind: ConfigErrorKind, message: impl Into<String>) {
        self.warnings.push(ConfigError::new(path, kind, message));
    }
}

/// Joins a path and a key: `providers[0]` + `name` → `providers[0].name`.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Joins a path and a list index: `providers` + 0 → `providers[0]`.
pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A value with the path it was found at.
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    pub value: &'a Value,
    pub path: &'a str,
}

impl<'a> At<'a> {
    fn wrong(&self, errs: &mut Errors, expected: &str) {
        errs.push(
            self.path,
            ConfigErrorKind::WrongType,
            format!("expected {expected}, found {}", type_name(self.value)),
        );
    }

    /// A string; numbers and booleans are not silently converted.
    pub fn string(&self, errs: &mut Errors) -> Option<String> {
        match self.value {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.wrong(errs, "a string");
                None
            }
        }
    }

    /// A scalar as a string (YAML `release: 21` is a number, used as "21").
    pub fn scalar_string(&self, errs: &mut Errors) -> Option<String> {
        match self.value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.wrong(errs, "a string");
                None
            }
        }
    }

    /// An integer.
    pub fn int(&self, errs: &mut Errors) -> Option<i64> {
        match self.value {
            Value::Number(n) if n.is_i64() || n.is_u64() => n.as_i64(),
            _ => {
                self.wrong(errs, "an integer");
                None
            }
        }
    }

    /// A non-negative integer.
    pub fn uint(&self, errs: &mut Errors) -> Option<u64> {
        let n = self.int(errs)?;
        if n < 0 {
            errs.push(
                self.path,
                ConfigErrorKind::InvalidValue,
                format!("must not be negative, found {n}"),
            );
            return None;
        }
        Some(n as u64)
    }

    /// A number (integers accepted).
    pub fn float(&self, errs: &mut Errors) -> Option<f64> {
        match self.value {
            Value::Number(n) => n.as_f64(),
            // Nodepool coerces `rate` with float(); accept numeric strings.
            Value::String(s) if s.trim().parse::<f64>().is_ok() => s.trim().parse().ok(),
            _ => {
                self.wrong(errs, "a number");
                None
            }
        }
    }

    /// A boolean.
    pub fn bool(&self, errs: &mut Errors) -> Option<bool> {
        match self.value {
            Value::Bool(b) => Some(*b),
            _ => {
                self.wrong(errs, "a boolean (true or false)");
                None
            }
        }
    }

    /// A list; each element comes with its indexed path.
    pub fn list(&self, errs: &mut Errors) -> Option<Vec<(String, &'a Value)>> {
        match self.value {
            Value::Sequence(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (index(self.path, i), v))
                    .collect(),
            ),
            _ => {
                self.wrong(errs, "a list");
                None
            }
        }
    }

    /// A list of strings.
    pub fn string_list(&self, errs: &mut Errors) -> Option<Vec<String>> {
        let items = self.list(errs)?;
        let mut out = Vec::with_capacity(items.len());
        for (path, v) in &items {
            if let Some(s) = (At { value: v, path }).string(errs) {
                out.push(s);
            }
        }
        Some(out)
    }

    /// A mapping of string keys to scalar values, as strings.
    pub fn string_map(&self, errs: &mut Errors) -> Option<IndexMap<String, String>> {
        let Value::Mapping(m) = self.value else {
            self.wrong(errs, "a mapping");
            return None;
        };
        let mut out = IndexMap::new();
        for (k, v) in m {
            let Some(key) = key_string(k) else {
                errs.push(
                    self.path,
                    ConfigErrorKind::WrongType,
                    "keys must be strings",
                );
                continue;
            };
            let path = join(self.path, &key);
            if let Some(s) = (At {
                value: v,
                path: &path,
            })
            .scalar_string(errs)
            {
                out.insert(key, s);
            }
        }
        Some(out)
    }

    /// A mapping read field by field.
    pub fn fields(&self, errs: &mut Errors) -> Option<Fields<'a>> {
        match self.value {
            Value::Mapping(m) => Some(Fields {
                path: self.path.to_owned(),
                map: m,
                asked: Vec::new(),
            }),
            _ => {
                self.wrong(errs, "a mapping");
                None
            }
        }
    }
}

fn key_string(k: &Value) -> Option<String> {
    match k {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A mapping being read. Keys are marked as known when asked for; the
/// rest are reported by [`Fields::finish`].
pub(crate) struct Fields<'a> {
    pub path: String,
    map: &'a serde_yaml::Mapping,
    asked: Vec<&'static str>,
}

/// A located value owning its path.
pub(crate) struct Field<'a> {
    pub value: &'a Value,
    pub path: String,
}

impl<'a> Field<'a> {
    pub fn at(&self) -> At<'_> {
        At {
            value: self.value,
            path: &self.path,
        }
    }
}

impl<'a> Fields<'a> {
    /// The value of a key, if present and not null. Marks the key as known.
    pub fn get(&mut self, key: &'static str) -> Option<Field<'a>> {
        self.asked.push(key);
        recorder::record(&self.path, key, recorder::Use::Read);
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(Field {
                value: v,
                path: join(&self.path, key),
            }),
        }
    }

    /// Whether a key is present (even as null). Does not mark it known.
    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some()
    }

    /// The path of a key of this mapping.
    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// A required key; reports it when missing.
    pub fn required(&mut self, key: &'static str, errs: &mut Errors) -> Option<Field<'a>> {
        let v = self.get(key);
        if v.is_none() {
            errs.push(
                &self.path_of(key),
                ConfigErrorKind::MissingKey,
                format!("required key `{key}` is missing"),
            );
        }
        v
    }

    /// An optional string.
    pub fn string(&mut self, key: &'static str, errs: &mut Errors) -> Option<String> {
        self.get(key).and_then(|f| f.at().string(errs))
    }

    /// A required string.
    pub fn required_string(&mut self, key: &'static str, errs: &mut Errors) -> Option<String> {
        self.required(key, errs).and_then(|f| f.at().string(errs))
    }

    /// An optional integer.
    pub fn int(&mut self, key: &'static str, errs: &mut Errors) -> Option<i64> {
        self.get(key).and_then(|f| f.at().int(errs))
    }

    /// An optional non-negative integer.
    pub fn uint(&mut self, key: &'static str, errs: &mut Errors) -> Option<u64> {
        self.get(key).and_then(|f| f.at().uint(errs))
    }

    /// An optional number.
    pub fn float(&mut self, key: &'static str, errs: &mut Errors) -> Option<f64> {
        self.get(key).and_then(|f| f.at().float(errs))
    }

    /// An optional boolean.
    pub fn bool(&mut self, key: &'static str, errs: &mut Errors) -> Option<bool> {
        self.get(key).and_then(|f| f.at().bool(errs))
    }

    /// A boolean that older documentation spells `old`: read under either
    /// name, the old one with a deprecation warning; both is a conflict.
    pub fn bool_or_old(
        &mut self,
        key: &'static str,
        old: &'static str,
        errs: &mut Errors,
    ) -> Option<bool> {
        recorder::record(&self.path, old, recorder::Use::AliasOf(key));
        let modern = self.bool(key, errs);
        if !self.has(old) {
            self.asked.push(old);
            return modern;
        }
        if self.has(key) {
            self.asked.push(old);
            errs.push(
                &self.path_of(old),
                ConfigErrorKind::Conflict,
                format!("`{old}` is the old spelling of `{key}`; set only `{key}`"),
            );
            return modern;
        }
        let value = self.bool(old, errs);
        errs.warn(
            &self.path_of(old),
            ConfigErrorKind::Deprecated,
            format!("`{old}` is the old spelling of `{key}`; read as `{key}`"),
        );
        value
    }

    /// An optional list of strings.
    pub fn string_list(&mut self, key: &'static str, errs: &mut Errors) -> Option<Vec<String>> {
        self.get(key).and_then(|f| f.at().string_list(errs))
    }

    /// An optional mapping of strings.
    pub fn string_map(
        &mut self,
        key: &'static str,
        errs: &mut Errors,
    ) -> Option<IndexMap<String, String>> {
        self.get(key).and_then(|f| f.at().string_map(errs))
    }

    /// An optional list whose items are read by `each`; items that fail
    /// to read are left out (their errors are recorded).
    pub fn list_of<T>(
        &mut self,
        key: &'static str,
        errs: &mut Errors,
        mut each: impl FnMut(At<'_>, &mut Errors) -> Option<T>,
    ) -> Vec<T> {
        let Some(f) = self.get(key) else {
            return Vec::new();
        };
        let Some(items) = f.at().list(errs) else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|(path, v)| each(At { value: v, path }, errs))
            .collect()
    }

    /// A key from an older Nodepool that was removed: an error saying what
    /// replaced it.
    pub fn removed(&mut self, key: &'static str, replacement: &str, errs: &mut Errors) {
        self.asked.push(key);
        recorder::record(
            &self.path,
            key,
            recorder::Use::Removed(replacement.to_owned()),
        );
        if self.has(key) {
            errs.push(
                &self.path_of(key),
                ConfigErrorKind::Removed,
                format!("`{key}` is no longer supported: {replacement}"),
            );
        }
    }

    /// Marks keys as known without reading them.
    pub fn allow(&mut self, keys: &[&'static str]) {
        self.asked.extend_from_slice(keys);
        for key in keys {
            recorder::record(&self.path, key, recorder::Use::Read);
        }
    }

    /// Reports every key nobody asked for, with a suggestion.
    pub fn finish(self, errs: &mut Errors) {
        for (k, _) in self.map {
            let Some(key) = key_string(k) else {
                errs.push(
                    &self.path,
                    ConfigErrorKind::WrongType,
                    "keys must be strings",
                );
                continue;
            };
            if self.asked.contains(&key.as_str()) {
                continue;
            }
            let message = match suggest(&key, &self.asked) {
                Some(s) => format!("unknown key `{key}`; did you mean `{s}`?"),
                None => format!("unknown key `{key}`"),
            };
            errs.push(
                &join(&self.path, &key),
                ConfigErrorKind::UnknownKey,
                message,
            );
        }
    }
}

/// Which keys the parser asks for, by path pattern, so the configuration
/// reference ([`super::reference`]) can be checked against the parser
/// itself. Recording exists in test builds only; elsewhere `record` is
/// empty and compiles away.
pub(crate) mod recorder {
    /// How the parser used a key.
    #[derive(Clone, Debug, PartialEq, Eq)]
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) enum Use {
        /// Read as a current key.
        Read,
        /// Read as the old spelling of the named key.
        AliasOf(&'static str),
        /// Rejected as removed, with this explanation.
        Removed(String),
    }

    /// `providers[0].pools[12]` + `name` → `providers[].pools[].name`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn pattern(path: &str, key: &str) -> String {
        let mut out = String::with_capacity(path.len() + key.len() + 1);
        let mut in_index = false;
        for c in path.chars() {
            match c {
                '[' => {
                    in_index = true;
                    out.push('[');
                }
                ']' => {
                    in_index = false;
                    out.push(']');
                }
                _ if in_index => {}
                _ => out.push(c),
            }
        }
        super::join(&out, key)
    }

    #[cfg(test)]
    thread_local! {
        static SEEN: std::cell::RefCell<Option<std::collections::BTreeMap<String, Use>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// Notes that the parser asked for `key` of the mapping at `path`
    /// (the first use seen wins: an alias is noted before it is read).
    #[cfg(test)]
    pub(crate) fn record(path: &str, key: &str, how: Use) {
        SEEN.with(|s| {
            if let Some(seen) = s.borrow_mut().as_mut() {
                seen.entry(pattern(path, key)).or_insert(how);
            }
        });
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) fn record(_path: &str, _key: &str, _how: Use) {}

    /// Records every key asked for while `f` runs on this thread.
    #[cfg(test)]
    pub(crate) fn keys_asked(f: impl FnOnce()) -> std::collections::BTreeMap<String, Use> {
        SEEN.with(|s| *s.borrow_mut() = Some(Default::default()));
        f();
        SEEN.with(|s| s.borrow_mut().take().unwrap_or_default())
    }
}

/// The closest known key, if it is close enough to be a likely typo.
pub(crate) fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let normalized = key.replace('_', "-").to_lowercase();
    known
        .iter()
        .map(|k| (*k, strsim::damerau_levenshtein(&normalized, k)))
        .filter(|(k, d)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(_, d)| *d)
        .map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_and_underscores() {
        let known = ["max-servers", "min-ready", "name"];
        assert_eq!(suggest("max_servers", &known), Some("max-servers"));
        assert_eq!(suggest("min-raedy", &known), Some("min-ready"));
        assert_eq!(suggest("completely-different", &known), None);
    }

    #[test]
    fn syntax_errors_carry_a_location() {
        let err = parse("a: [1, 2\nb: 3").unwrap_err();
        assert_eq!(err.errors[0].kind, ConfigErrorKind::Syntax);
        assert!(err.errors[0].path.starts_with("line "));
    }
}
