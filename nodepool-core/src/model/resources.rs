//! Quota arithmetic: the `resources` dict of a node and the limits of pools,
//! tenants and clouds.

use std::borrow::Cow;
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

type Name = Cow<'static, str>;

/// Quota names without allocating for the common ones (quota arithmetic
/// runs for every node and request of every planning pass).
fn intern(name: &str) -> Name {
    match name {
        INSTANCES => Cow::Borrowed(INSTANCES),
        CORES => Cow::Borrowed(CORES),
        RAM => Cow::Borrowed(RAM),
        VOLUMES => Cow::Borrowed(VOLUMES),
        VOLUME_GB => Cow::Borrowed(VOLUME_GB),
        other => Cow::Owned(other.to_owned()),
    }
}

fn same(a: &str, b: &str) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
}

/// A bit for each common quota name, and one for any other name.
fn name_bit(name: &str) -> u8 {
    match name {
        INSTANCES => 1,
        CORES => 2,
        RAM => 4,
        VOLUMES => 8,
        VOLUME_GB => 16,
        _ => OTHER_NAMES,
    }
}

const OTHER_NAMES: u8 = 32;

/// A small map from quota name to amount, sorted by name.
#[derive(Clone, Default, PartialEq, Eq)]
struct Amounts {
    entries: Vec<(Name, i64)>,
    /// The [`name_bit`]s of the names present: two maps with the same bits
    /// and only common names have their entries in the same order.
    names: u8,
}

impl Amounts {
    fn get(&self, name: &str) -> Option<i64> {
        self.entries
            .iter()
            .find(|(k, _)| same(k, name))
            .map(|(_, v)| *v)
    }

    /// The entries of `self` and `other` side by side, if they name the
    /// same common quotas.
    fn aligned<'s>(
        &'s mut self,
        other: &'s Amounts,
    ) -> Option<impl Iterator<Item = (&'s mut i64, i64)>> {
        (self.names == other.names && self.names & OTHER_NAMES == 0).then(|| {
            self.entries
                .iter_mut()
                .zip(&other.entries)
                .map(|(a, b)| (&mut a.1, b.1))
        })
    }

    fn slot(&mut self, name: &str) -> &mut i64 {
        // A handful of entries: a linear scan beats a binary search, and
        // interned names usually match by pointer.
        let pos = match self.entries.iter().position(|(k, _)| same(k, name)) {
            Some(i) => i,
            None => {
                let i = self.entries.partition_point(|(k, _)| k.as_ref() < name);
                self.entries.insert(i, (intern(name), 0));
                self.names |= name_bit(name);
                i
            }
        };
        &mut self.entries[pos].1
    }

    fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.entries.iter().map(|(k, v)| (k.as_ref(), *v))
    }
}

impl Serialize for Amounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            m.serialize_entry(k.as_ref(), v)?;
        }
        m.end()
    }
}

/// A bag of named quota amounts, e.g. `{"cores": 8, "instances": 1, "ram": 8192}`.
///
/// Missing names count as zero. This is the node's `resources` field on the
/// wire and the unit of every quota computation.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
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
        // Usage is summed over every node of every pass, and nodes mostly
        // name the same quotas: then the entries line up one to one.
        if let Some(pairs) = self.0.aligned(&other.0) {
            for (a, b) in pairs {
                *a += b;
            }
            return;
        }
        for (k, v) in other.0.iter() {
            *self.0.slot(k) += v;
        }
    }

    /// Subtracts every amount of `other`.
    pub fn subtract(&mut self, other: &Resources) {
        for (k, v) in other.0.iter() {
            *self.0.slot(k) -= v;
        }
    }

    /// Iterates over the named amounts.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter()
    }

    /// Whether no amount is set.
    pub fn is_empty(&self) -> bool {
        self.0.entries.is_empty()
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
        self.0.iter().find_map(|(name, limit)| {
            let want = need.get(name);
            if want == 0 {
                return None;
            }
            (used.get(name) + want > limit).then_some(name)
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
        self.0.entries.is_empty()
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
