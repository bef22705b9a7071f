//! Cloud rules every provider backend shares, so the simulated cloud and
//! OpenStack (and any new backend) behave alike: Nova's flavor choice,
//! its metadata limits, and how a quota refusal is recognised.
//!
//! ## Metadata
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

use crate::config::PoolLabel;

/// What the flavor rule needs to know of a flavor.
pub trait Flavor {
    /// Its name.
    fn name(&self) -> &str;
    /// Its cloud id (a label's `flavor-name` may name the id).
    fn id(&self) -> &str {
        self.name()
    }
    /// RAM in MiB.
    fn ram(&self) -> i64;
    /// Whether the cloud disabled it (never chosen by `min-ram`).
    fn disabled(&self) -> bool {
        false
    }
}

/// The simulated cloud's flavors: a flavor's id is its name.
impl Flavor for crate::config::SimulatedFlavor {
    fn name(&self) -> &str {
        &self.name
    }
    fn ram(&self) -> i64 {
        self.ram
    }
}

/// The flavor a label boots (reference §3.4): with `min-ram`, the smallest
/// enabled flavor with at least that much RAM whose name contains
/// `flavor-name` (when given), ties broken by name; with `flavor-name`
/// alone, the flavor of that name, else of that id. `None` when nothing
/// matches.
pub fn choose_flavor<'f, F: Flavor>(flavors: &'f [F], label: &PoolLabel) -> Option<&'f F> {
    match (label.min_ram, &label.flavor_name) {
        (Some(min_ram), name) => flavors
            .iter()
            .filter(|f| !f.disabled() && f.ram() >= min_ram)
            .filter(|f| name.as_ref().is_none_or(|n| f.name().contains(n.as_str())))
            .min_by(|a, b| (a.ram(), a.name()).cmp(&(b.ram(), b.name()))),
        (None, Some(name)) => flavors
            .iter()
            .find(|f| f.name() == name)
            .or_else(|| flavors.iter().find(|f| f.id() == name)),
        (None, None) => None,
    }
}

/// Whether a cloud message says a quota ran out (Nova's `Quota exceeded
/// for instances`, Neutron's `OverQuota`, `... exceeds ... quota`, Python
/// Nodepool's `number of ports exceeded`).
pub fn is_quota_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    (m.contains("quota") && (m.contains("exceed") || m.contains("overquota")))
        || m.contains("overquota")
        || m.contains("number of ports exceeded")
}

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

    struct F(&'static str, &'static str, i64, bool);
    impl Flavor for F {
        fn name(&self) -> &str {
            self.0
        }
        fn id(&self) -> &str {
            self.1
        }
        fn ram(&self) -> i64 {
            self.2
        }
        fn disabled(&self) -> bool {
            self.3
        }
    }

    fn label(flavor_name: Option<&str>, min_ram: Option<i64>) -> PoolLabel {
        PoolLabel {
            name: "l".into(),
            image: crate::config::ImageSource::CloudImage("img".into()),
            flavor_name: flavor_name.map(str::to_owned),
            min_ram,
            key_name: None,
            console_log: false,
            boot_from_volume: false,
            volume_size: 50,
            instance_properties: IndexMap::new(),
            dynamic_instance_properties: IndexMap::new(),
            userdata: None,
            networks: Vec::new(),
            host_key_checking: false,
        }
    }

    #[test]
    fn flavors_by_min_ram_name_and_id() {
        let flavors = [
            F("big", "f3", 8192, false),
            F("small-b", "f2", 2048, false),
            F("small-a", "f1", 2048, false),
            F("off", "f0", 4096, true),
        ];
        let pick = |name, ram| choose_flavor(&flavors, &label(name, ram)).map(|f| f.0);
        assert_eq!(
            pick(None, Some(2000)),
            Some("small-a"),
            "smallest, then by name"
        );
        assert_eq!(pick(Some("big"), Some(100)), Some("big"));
        assert_eq!(
            pick(None, Some(3000)),
            Some("big"),
            "disabled flavors are skipped"
        );
        assert_eq!(pick(Some("small-b"), None), Some("small-b"));
        assert_eq!(
            pick(Some("f3"), None),
            Some("big"),
            "by id when no name matches"
        );
        assert_eq!(pick(None, None), None);
        assert_eq!(pick(None, Some(100_000)), None);
    }

    #[test]
    fn quota_messages() {
        assert!(is_quota_message(
            "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances"
        ));
        assert!(is_quota_message(
            "OverQuota: Quota exceeded for resources: ['port']"
        ));
        assert!(is_quota_message("Maximum number of ports exceeded"));
        assert!(!is_quota_message("No valid host was found."));
    }

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
