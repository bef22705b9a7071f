//! The pool registry: every registered pool (other launchers' and ours),
//! numbered so that sets of pools are bitsets listing our candidates in
//! pickup order, and the labels they serve, numbered once per pass.

use super::Snapshot;
use super::fast::{FastMap, Key};
use super::index::Index;
use crate::config::Config;
use crate::store::RequestRecord;

/// A fixed-size set of registered-pool indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PoolSet(Vec<u64>);

impl PoolSet {
    fn empty(n: usize) -> Self {
        PoolSet(vec![0; n.div_ceil(64).max(1)])
    }
    fn full(n: usize) -> Self {
        let mut s = PoolSet::empty(n);
        for i in 0..n {
            s.insert(i);
        }
        s
    }
    pub(super) fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    #[cfg(test)]
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn and(&mut self, o: &PoolSet) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a &= b;
        }
    }
    fn and_not(&mut self, o: &PoolSet) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a &= !b;
        }
    }
    pub(super) fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    pub(super) fn is_superset(&self, o: &PoolSet) -> bool {
        self.0.iter().zip(&o.0).all(|(a, b)| a & b == *b)
    }
    /// Makes this set a copy of `o` (same size), keeping its allocation.
    fn copy_from(&mut self, o: &PoolSet) {
        self.0.copy_from_slice(&o.0);
    }
    pub(super) fn clear(&mut self) {
        self.0.fill(0);
    }
    pub(super) fn iter(&self) -> PoolSetIter<'_> {
        PoolSetIter {
            words: &self.0,
            word: 0,
            bits: self.0.first().copied().unwrap_or(0),
        }
    }
}

/// The members of a [`PoolSet`] in ascending order, a set bit at a time
/// (a scan of every bit position cost more than the rest of pickup).
pub(super) struct PoolSetIter<'s> {
    words: &'s [u64],
    word: usize,
    bits: u64,
}

impl Iterator for PoolSetIter<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.words.get(self.word)?;
        }
        let b = self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(self.word * 64 + b)
    }
}

/// A registered pool, as far as pickup needs it.
#[derive(Clone, Copy)]
pub(super) struct RegPool<'r> {
    pub(super) provider: &'r str,
    pub(super) priority: i64,
    paused: bool,
    /// Its provider's API is failing (our pools: the provider's outage;
    /// other launchers': what their pool component says).
    pub(super) unavailable: bool,
}

/// Registered pools and how to find them.
pub(crate) struct Registry<'r> {
    pub(super) pools: Vec<RegPool<'r>>,
    pub(super) ids: Vec<&'r str>,
    pub(super) by_id: FastMap<&'r str, usize>,
    /// A number for every label some registered pool serves: a request's
    /// labels are looked up by name once, and by number after that.
    label_ids: FastMap<Key<'r>, usize>,
    /// The registered pools serving each label, by label number.
    by_label: Vec<PoolSet>,
    pub(super) all: PoolSet,
    pub(super) none: PoolSet,
    /// Registered index of each of our pools (aligned with `Index::our_pools`).
    pub(super) ours: Vec<usize>,
    /// Our pool position of each registered pool, if it is ours.
    pub(super) our_pos: Vec<Option<usize>>,
    /// The registered pools that are ours.
    ours_set: PoolSet,
    /// Other launchers' pools that are not paused.
    others_unpaused: PoolSet,
    /// Other launchers' pools that are paused.
    pub(super) others_paused: PoolSet,
    /// The labels each registered pool can boot now, as published in its
    /// component (`None`: its launcher does not say).
    launchable: Vec<Option<Vec<&'r str>>>,
}

impl<'r> Registry<'r> {
    pub fn build(s: &'r Snapshot, cfg: &'r Config, idx: &'r Index<'_>) -> Self {
        // Entries in listing order, then renumbered below.
        let mut pools = Vec::with_capacity(s.pools.len() + idx.our_pools.len());
        let mut ids = Vec::with_capacity(pools.capacity());
        let mut by_id: FastMap<&'r str, usize> = FastMap::default();
        let mut labels: Vec<Vec<&'r str>> = Vec::new();
        let mut launchable: Vec<Option<Vec<&'r str>>> = Vec::new();
        for p in &s.pools {
            launchable.push(
                p.launchable
                    .as_ref()
                    .map(|ls| ls.iter().map(String::as_str).collect()),
            );
            by_id.insert(p.id.as_str(), pools.len());
            ids.push(p.id.as_str());
            pools.push(RegPool {
                provider: p.provider.as_str(),
                priority: p.priority,
                paused: p.paused,
                unavailable: p.unavailable,
            });
            labels.push(p.labels.iter().map(String::as_str).collect());
        }
        // Our own pools count even before their registration is visible.
        for ours in &idx.our_pools {
            if !by_id.contains_key(ours.id.as_str()) {
                let pc = &cfg.providers[ours.provider].pools[ours.pool];
                by_id.insert(ours.id.as_str(), pools.len());
                ids.push(ours.id.as_str());
                pools.push(RegPool {
                    provider: ours.key.provider.as_str(),
                    priority: ours.priority,
                    paused: false,
                    unavailable: false,
                });
                labels.push(pc.labels.iter().map(|l| l.name.as_str()).collect());
                launchable.push(Some(ours.launchable.clone()));
            }
        }
        let n = pools.len();
        let mut our_pos = vec![None; n];
        for (pos, ours) in idx.our_pools.iter().enumerate() {
            let i = by_id[ours.id.as_str()];
            our_pos[i] = Some(pos);
            // What we know now beats what our component said last pass.
            pools[i].unavailable = idx.outage[ours.provider].is_some();
        }
        // Renumber: our pools first, in the order they take requests
        // (priority, then position), then the others. Sets of pools then
        // list our candidates in pickup order, with nothing to sort.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&i| match our_pos[i] {
            Some(pos) => (false, idx.our_pools[pos].priority, pos),
            None => (true, 0, i),
        });
        let mut renumbered = vec![0; n];
        for (new, &old) in order.iter().enumerate() {
            renumbered[old] = new;
        }
        let pools: Vec<RegPool<'r>> = order.iter().map(|&old| pools[old]).collect();
        let ids: Vec<&'r str> = order.iter().map(|&old| ids[old]).collect();
        let labels: Vec<Vec<&'r str>> = order
            .iter()
            .map(|&old| std::mem::take(&mut labels[old]))
            .collect();
        let our_pos: Vec<Option<usize>> = order.iter().map(|&old| our_pos[old]).collect();
        let launchable: Vec<Option<Vec<&'r str>>> = order
            .iter()
            .map(|&old| std::mem::take(&mut launchable[old]))
            .collect();
        for i in by_id.values_mut() {
            *i = renumbered[*i];
        }
        let mut label_ids: FastMap<Key<'r>, usize> = FastMap::default();
        let mut by_label: Vec<PoolSet> = Vec::new();
        for (i, ls) in labels.iter().enumerate() {
            for l in ls {
                let id = *label_ids.entry(Key(l)).or_insert_with(|| {
                    by_label.push(PoolSet::empty(n));
                    by_label.len() - 1
                });
                by_label[id].insert(i);
            }
        }
        let ours: Vec<usize> = idx.our_pools.iter().map(|o| by_id[o.id.as_str()]).collect();
        let mut ours_set = PoolSet::empty(n);
        let mut others_unpaused = PoolSet::empty(n);
        let mut others_paused = PoolSet::empty(n);
        for (i, p) in pools.iter().enumerate() {
            match (our_pos[i], p.paused) {
                (Some(_), _) => ours_set.insert(i),
                (None, false) => others_unpaused.insert(i),
                (None, true) => others_paused.insert(i),
            }
        }
        Registry {
            ours_set,
            others_unpaused,
            others_paused,
            ids,
            our_pos,
            all: PoolSet::full(n),
            none: PoolSet::empty(n),
            pools,
            by_id,
            label_ids,
            by_label,
            ours,
            launchable,
        }
    }

    /// Whether registered pool `i` can boot `label` now, by what its
    /// component says (so every launcher reading the same snapshot gets
    /// the same answer): it is not paused and, when its launcher publishes
    /// them, lists the label among its launchable labels.
    pub fn can_launch(&self, i: usize, label: &str) -> bool {
        !self.pools[i].paused
            && self.launchable[i]
                .as_ref()
                .is_none_or(|ls| ls.contains(&label))
    }

    /// The registered pools serving a label.
    pub fn serving<'s>(&'s self, label: &str) -> impl Iterator<Item = usize> + use<'s, 'r> {
        let pools = self
            .label_ids
            .get(&Key(label))
            .map(|&id| &self.by_label[id]);
        pools.into_iter().flat_map(PoolSet::iter)
    }

    /// A registered pool's id.
    pub fn id(&self, i: usize) -> &'r str {
        self.ids[i]
    }

    /// Whether a registered pool id is one of this launcher's pools.
    pub fn is_ours(&self, id: &str) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|&i| self.our_pos[i].is_some())
    }

    pub(super) fn declined(&self, req: &RequestRecord) -> PoolSet {
        let mut d = self.none.clone();
        self.declined_into(req, &mut d);
        d
    }

    /// The registered pools that declined the request, into `d`.
    pub(super) fn declined_into(&self, req: &RequestRecord, d: &mut PoolSet) {
        d.clear();
        for id in &req.request.declined_by {
            if let Some(&i) = self.by_id.get(id.as_str()) {
                d.insert(i);
            }
        }
    }

    /// The number of a label, if some registered pool serves it.
    pub(super) fn label_id(&self, label: &str) -> Option<usize> {
        self.label_ids.get(&Key(label)).copied()
    }

    /// The numbers of the labels, into `ids`; false if a label is served
    /// by no registered pool.
    pub(super) fn label_ids_into(&self, labels: &[String], ids: &mut Vec<usize>) -> bool {
        ids.clear();
        for l in labels {
            match self.label_ids.get(&Key(l)) {
                Some(&id) => ids.push(id),
                None => return false,
            }
        }
        true
    }

    /// Candidates split in one pass over the words: the unpaused ones, other
    /// launchers' unpaused ones, and ours. Returns whether any of ours is
    /// unpaused.
    pub(super) fn split(
        &self,
        cand: &PoolSet,
        paused: &PoolSet,
        unpaused: &mut PoolSet,
        others: &mut PoolSet,
        ours: &mut PoolSet,
    ) -> bool {
        let mut any = 0;
        for (w, &c) in cand.0.iter().enumerate() {
            let up = c & !paused.0[w];
            unpaused.0[w] = up;
            others.0[w] = c & self.others_unpaused.0[w];
            ours.0[w] = c & self.ours_set.0[w];
            any |= up & self.ours_set.0[w];
        }
        any != 0
    }

    /// The registered pools serving every label (by number) that have not
    /// declined, into `c`.
    pub(super) fn candidates_into(&self, ids: &[usize], declined: &PoolSet, c: &mut PoolSet) {
        c.copy_from(&self.all);
        for &id in ids {
            c.and(&self.by_label[id]);
        }
        c.and_not(declined);
    }
}

/// Up to three label numbers as one key, with their count.
fn pack_ids(ids: &[usize]) -> Option<u128> {
    if ids.len() > 3 {
        return None;
    }
    let mut key = ids.len() as u128;
    for (k, &id) in ids.iter().enumerate() {
        key |= u128::from(u32::try_from(id).ok()?) << (8 + 32 * k);
    }
    Some(key)
}

/// A key for a request's labels in order (short lists only).
pub(super) fn sequence_key(ids: &[usize]) -> Option<u128> {
    pack_ids(ids)
}

/// A key for the set of a request's labels (small sets only).
pub(super) fn set_key(ids: &[usize]) -> Option<u128> {
    let mut set = [0; 3];
    let mut n = 0;
    for &id in ids {
        if !set[..n].contains(&id) {
            *set.get_mut(n)? = id;
            n += 1;
        }
    }
    set[..n].sort_unstable();
    pack_ids(&set[..n])
}

#[cfg(test)]
mod tests {
    use super::{PoolSet, sequence_key, set_key};

    #[test]
    fn pool_sets() {
        let mut a = PoolSet::full(70);
        let mut b = PoolSet::empty(70);
        b.insert(3);
        b.insert(65);
        assert!(a.is_superset(&b));
        a.and(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), [3, 65]);
        a.and_not(&b);
        assert!(a.is_empty());
        assert!(!a.contains(3));
        let mut c = PoolSet::full(130);
        assert_eq!(c.iter().count(), 130);
        assert_eq!(c.iter().last(), Some(129));
        c.clear();
        assert_eq!(c.iter().next(), None);
        assert_eq!(PoolSet::empty(0).iter().next(), None);
    }

    #[test]
    fn label_keys() {
        assert_eq!(set_key(&[3, 1, 3]), set_key(&[1, 3]));
        assert_ne!(set_key(&[1]), set_key(&[1, 3]));
        assert_eq!(set_key(&[1, 2, 3, 3, 2]), set_key(&[3, 2, 1]));
        assert_eq!(set_key(&[1, 2, 3, 4]), None);
        assert_ne!(sequence_key(&[1, 3]), sequence_key(&[3, 1]));
        assert_ne!(sequence_key(&[1]), sequence_key(&[1, 1]));
        assert_ne!(sequence_key(&[]), sequence_key(&[0]));
        assert_eq!(sequence_key(&[1, 1, 1, 1]), None);
    }
}
