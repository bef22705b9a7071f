//! Quota arithmetic: the `resources` dict of a node and the limits of pools,
//! tenants and clouds.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Quota name for the number of servers.
pub const INSTANCES: &str = "instances";
/// Quota name for vCPUs.
pub const CORES: &str = "cores";
/// Quota name for RAM in MiB.
pub const RAM: &str = "ram";
/// Quota name for the number of volumes.
pub const VOLUMES: &str = "volumes";
/// Quota name for volume size in GB (the dash is Nodepool's spelling).
pub const VOLUME_GB: &str = "volume-gb";

/// The quota names almost every node carries, in name order.
const COMMON: [&str; 5] = [CORES, INSTANCES, RAM, VOLUME_GB, VOLUMES];

/// The position of a name in [`COMMON`].
fn common(name: &str) -> Option<usize> {
    match name {
        CORES => Some(0),
        INSTANCES => Some(1),
        RAM => Some(2),
        VOLUME_GB => Some(3),
        VOLUMES => Some(4),
        _ => None,
    }
}

/// A small map from quota name to amount, listed in name order.
///
/// The common names are kept inline, so most maps need no allocation and
/// reading a node's quota (every node, every planning pass) touches no
/// memory beyond the node itself.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
struct Amounts {
    /// Amounts of the common names, zero where absent.
    common: [i64; COMMON.len()],
    /// Which common names are present, a bit each by position.
    present: u8,
    /// Any other names, in name order.
    other: Vec<(String, i64)>,
}

impl Amounts {
    fn has(&self, k: usize) -> bool {
        self.present & (1 << k) != 0
    }

    fn get(&self, name: &str) -> Option<i64> {
        match common(name) {
            Some(k) => self.has(k).then_some(self.common[k]),
            None => self.other.iter().find(|(n, _)| n == name).map(|(_, v)| *v),
        }
    }

    fn slot(&mut self, name: &str) -> &mut i64 {
        if let Some(k) = common(name) {
            self.present |= 1 << k;
            return &mut self.common[k];
        }
        let i = match self.other.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => i,
            Err(i) => {
                self.other.insert(i, (name.to_owned(), 0));
                i
            }
        };
        &mut self.other[i].1
    }

    /// Every entry in name order, with its position in [`COMMON`] if it
    /// has one.
    fn entries(&self) -> impl Iterator<Item = (&str, i64, Option<usize>)> {
        let mut common = (0..COMMON.len())
            .filter(|&k| self.has(k))
            .map(|k| (COMMON[k], self.common[k], Some(k)))
            .peekable();
        let mut other = self
            .other
            .iter()
            .map(|(n, v)| (n.as_str(), *v, None))
            .peekable();
        std::iter::from_fn(move || match (common.peek(), other.peek()) {
            (Some(c), Some(o)) if o.0 < c.0 => other.next(),
            (Some(_), _) => common.next(),
            (None, _) => other.next(),
        })
    }

    fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.entries().map(|(n, v, _)| (n, v))
    }

    fn len(&self) -> usize {
        self.present.count_ones() as usize + self.other.len()
    }

    fn is_empty(&self) -> bool {
        self.present == 0 && self.other.is_empty()
    }

    /// Combines every amount of `o` into this map with `op`.
    fn merge(&mut self, o: &Amounts, op: impl Fn(i64, i64) -> i64) {
        for k in 0..COMMON.len() {
            if o.has(k) {
                self.present |= 1 << k;
                self.common[k] = op(self.common[k], o.common[k]);
            }
        }
        for (n, v) in &o.other {
            let slot = self.slot(n);
            *slot = op(*slot, *v);
        }
    }
}

impl Serialize for Amounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, &v)?;
        }
        m.end()
    }
}

/// A bag of named quota amounts, e.g. `{"cores": 8, "instances": 1, "ram": 8192}`.
///
/// Missing names count as zero. This is the node's `resources` field on the
/// wire and the unit of every quota computation.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Resources(Amounts);

impl Resources {
    /// No resources.
    pub fn new() -> Self {
        Resources(Amounts::default())
    }

    /// One server with the given cores and RAM (MiB).
    pub fn server(cores: i64, ram: i64) -> Self {
        let mut r = Resources::new();
        r.set(INSTANCES, 1);
        r.set(CORES, cores);
        r.set(RAM, ram);
        r
    }

    /// Sets one amount.
    pub fn set(&mut self, name: &str, amount: i64) {
        *self.0.slot(name) = amount;
    }

    /// Builder form of [`Resources::set`].
    pub fn with(mut self, name: &str, amount: i64) -> Self {
        self.set(name, amount);
        self
    }

    /// One amount, zero when absent.
    pub fn get(&self, name: &str) -> i64 {
        self.0.get(name).unwrap_or(0)
    }

    /// Adds every amount of `other`.
    pub fn add(&mut self, other: &Resources) {
        self.0.merge(&other.0, |a, b| a + b);
    }

    /// Subtracts every amount of `other`.
    pub fn subtract(&mut self, other: &Resources) {
        self.0.merge(&other.0, |a, b| a - b);
    }

    /// Iterates over the named amounts.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter()
    }

    /// Whether no amount is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl<'de> Deserialize<'de> for Resources {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Drivers write ints; accept floats too (truncated) and skip values
        // that are not numbers rather than rejecting the whole node.
        let raw = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let mut r = Resources::new();
        for (k, v) in raw {
            if let Some(n) = v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)) {
                r.set(&k, n);
            }
        }
        Ok(r)
    }
}

/// Upper bounds on named amounts; a missing name is unlimited.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Limits(Amounts);

impl Limits {
    /// No limits at all.
    pub fn unlimited() -> Self {
        Limits(Amounts::default())
    }

    /// Sets the limit for one name.
    pub fn set(&mut self, name: &str, limit: i64) {
        *self.0.slot(name) = limit;
    }

    /// Builder form of [`Limits::set`].
    pub fn with(mut self, name: &str, limit: i64) -> Self {
        self.set(name, limit);
        self
    }

    /// The limit for one name; `None` = unlimited.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.0.get(name)
    }

    /// Iterates over the limited names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter()
    }

    /// Whether `used + need` stays within every limit.
    pub fn fits(&self, used: &Resources, need: &Resources) -> bool {
        self.first_exceeded(used, need).is_none()
    }

    /// The first quota name that `used + need` would exceed.
    pub fn first_exceeded(&self, used: &Resources, need: &Resources) -> Option<&str> {
        self.0.entries().find_map(|(name, limit, k)| {
            let (want, have) = match k {
                Some(k) => (need.0.common[k], used.0.common[k]),
                None => (need.get(name), used.get(name)),
            };
            if want == 0 {
                return None;
            }
            (have + want > limit).then_some(name)
        })
    }

    /// The tighter of two limit sets, name by name.
    pub fn min(&self, other: &Limits) -> Limits {
        let mut out = self.clone();
        for (k, v) in other.0.iter() {
            let cur = out.get(k).map_or(v, |c| c.min(v));
            out.set(k, cur);
        }
        out
    }

    /// These limits minus some usage (e.g. cloud limits minus unmanaged servers).
    pub fn minus(&self, used: &Resources) -> Limits {
        let mut out = self.clone();
        for (k, v) in self.0.iter() {
            out.set(k, v - used.get(k));
        }
        out
    }

    /// Whether no name is limited.
    pub fn is_unlimited(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl Serialize for Limits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_whatever_the_names() {
        let mut a = Resources::server(2, 1024);
        a.add(&Resources::server(4, 2048));
        assert_eq!(a, Resources::server(6, 3072).with(INSTANCES, 2));
        a.add(&Resources::new().with("gpus", 1).with(CORES, 1));
        assert_eq!(a.get(CORES), 7);
        assert_eq!(a.get("gpus"), 1);
        let mut b = Resources::new().with("gpus", 2);
        b.add(&Resources::new().with("gpus", 3));
        assert_eq!(b.get("gpus"), 5);
        b.add(&Resources::new().with("fpgas", 1));
        assert_eq!(b.iter().collect::<Vec<_>>(), [("fpgas", 1), ("gpus", 5)]);
        let mut c = Resources::new();
        c.add(&Resources::server(1, 1));
        assert_eq!(c, Resources::server(1, 1));
    }

    #[test]
    fn names_list_in_order_whichever_kind() {
        let r = Resources::new()
            .with("zz", 1)
            .with(VOLUMES, 2)
            .with("a", 3)
            .with(RAM, 4)
            .with("volume-", 5)
            .with(CORES, 6);
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            [
                ("a", 3),
                (CORES, 6),
                (RAM, 4),
                ("volume-", 5),
                (VOLUMES, 2),
                ("zz", 1)
            ]
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"a":3,"cores":6,"ram":4,"volume-":5,"volumes":2,"zz":1}"#
        );
        assert_eq!(
            format!("{r:?}"),
            r#"{"a": 3, "cores": 6, "ram": 4, "volume-": 5, "volumes": 2, "zz": 1}"#
        );
        // A name present at zero is not a name absent.
        assert_ne!(Resources::new().with(RAM, 0), Resources::new());
        assert_eq!(Resources::new().with(RAM, 0).get(RAM), 0);
        assert!(Resources::new().is_empty());
        assert!(!Resources::new().with("x", 0).is_empty());
        let mut d = Resources::server(4, 100).with("gpus", 2);
        d.subtract(&Resources::server(1, 50).with("gpus", 1).with(VOLUMES, 1));
        assert_eq!(
            d.iter().collect::<Vec<_>>(),
            [
                (CORES, 3),
                ("gpus", 1),
                (INSTANCES, 0),
                (RAM, 50),
                (VOLUMES, -1)
            ]
        );
        let limits = Limits::unlimited().with("gpus", 1).with(RAM, 10);
        assert_eq!(
            limits.first_exceeded(
                &Resources::new(),
                &Resources::new().with("gpus", 2).with(RAM, 11)
            ),
            Some("gpus")
        );
    }

    #[test]
    fn fits_checks_only_needed_names() {
        let limits = Limits::unlimited().with(CORES, 8).with(INSTANCES, 2);
        let used = Resources::server(4, 1024);
        assert!(limits.fits(&used, &Resources::server(4, 1024)));
        assert_eq!(
            limits.first_exceeded(&used, &Resources::server(5, 0)),
            Some(CORES)
        );
        // a need of zero cores never trips the cores limit, even when
        // cores are already over
        let over = Resources::server(100, 0);
        assert!(limits.fits(&over, &Resources::new().with(INSTANCES, 1)));
        let full = Resources::new().with(INSTANCES, 2);
        assert!(!limits.fits(&full, &Resources::new().with(INSTANCES, 1)));
        assert!(limits.min(&Limits::unlimited()).get(RAM).is_none());
        assert_eq!(
            limits.min(&Limits::unlimited().with(CORES, 4)).get(CORES),
            Some(4)
        );
    }

    #[test]
    fn resources_read_floats_and_skip_junk() {
        let r: Resources =
            serde_json::from_str(r#"{"cores": 4.0, "ram": 8192, "x": "y"}"#).unwrap();
        assert_eq!(r.get(CORES), 4);
        assert_eq!(r.get(RAM), 8192);
        assert_eq!(r.get("x"), 0);
    }
}
