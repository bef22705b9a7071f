//! Nova's metadata limits, and the rule for values that break them.
//!
//! Nova rejects a server create with a 400 when a metadata key or value is
//! longer than 255 characters. Configuration validation already refuses
//! static values over 255 bytes (instance-properties, the `groups` value),
//! but dynamic instance properties are formatted from a request at launch
//! time, so a long one can still reach the provider. The rule: **a key or
//! value longer than 255 bytes is cut at the last UTF-8 character boundary
//! at or before byte 255, with a warning** — a launch never fails over
//! metadata. Bytes, not characters, because that is also safe for any
//! database column sized in bytes.

use indexmap::IndexMap;
use tracing::warn;

/// Longest metadata key or value Nova takes, in bytes.
pub const NOVA_METADATA_LIMIT: usize = 255;

/// The longest prefix of `s` that is at most `max` bytes and ends on a
/// character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The metadata with every key and value within Nova's limit.
pub fn fit_metadata(server: &str, metadata: &IndexMap<String, String>) -> IndexMap<String, String> {
    metadata
        .iter()
        .map(|(k, v)| {
            let key = truncate_utf8(k, NOVA_METADATA_LIMIT);
            let value = truncate_utf8(v, NOVA_METADATA_LIMIT);
            if key.len() != k.len() || value.len() != v.len() {
                warn!(
                    server,
                    key = %key,
                    key_bytes = k.len(),
                    value_bytes = v.len(),
                    limit = NOVA_METADATA_LIMIT,
                    "server metadata longer than Nova allows; truncated"
                );
            }
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate_utf8("abc", 255), "abc");
        let s = format!("{}é", "a".repeat(254)); // é is 2 bytes: 256 in all
        assert_eq!(truncate_utf8(&s, 255), "a".repeat(254));
        let euro = "€".repeat(100); // 300 bytes, 3 per char
        assert_eq!(truncate_utf8(&euro, 255).len(), 255);
        let s = format!("{}€", "a".repeat(253));
        assert_eq!(truncate_utf8(&s, 255), "a".repeat(253));
    }

    #[test]
    fn fit_keeps_short_values_and_order() {
        let m: IndexMap<String, String> = [
            ("b".to_owned(), "x".repeat(300)),
            ("a".to_owned(), "short".to_owned()),
        ]
        .into_iter()
        .collect();
        let f = fit_metadata("np1", &m);
        assert_eq!(f.keys().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(f["b"].len(), 255);
        assert_eq!(f["a"], "short");
    }
}
