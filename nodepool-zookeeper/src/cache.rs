//! The in-memory mirror of the cached subtree (`/nodepool`).
//!
//! Filled by one full load and kept fresh by one persistent recursive
//! watch (see `session.rs` for the event pipeline that feeds it). This
//! module holds the data structure and the full load; it knows nothing of
//! sessions.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::StreamExt;
use nodepool_model::store::{Entry, Stat, StoreEvent};
use zookeeper_client as zk;

use crate::store::Traffic;

/// How many reads the full load keeps in flight. ZooKeeper answers a
/// session's requests in order, so pipelining is what makes loading 10,000
/// nodes take milliseconds per thousand instead of a round trip each.
const LOAD_IN_FLIGHT: usize = 512;

/// One cached znode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cached {
    pub data: Bytes,
    pub stat: Stat,
}

/// Whether a watch event's znode is a request or node lock (its directory
/// or a contender) whose data nobody reads: only its existence says
/// something (a request or node is locked), and the request lock
/// directory's age, which the event's arrival time gives closely enough
/// for stale-lock cleanup (hours). Reading them was 4 of the ~11 reads a
/// request cost every mirror; Python Nodepool's and Zuul's tree caches do
/// not fetch them either (only paths that map to a cached record are
/// fetched; `preCacheHook` tracks contenders by path).
pub(crate) fn is_unread_lock(path: &str) -> bool {
    use nodepool_model::store::paths::{LOCK, NODES, REQUESTS_LOCK, lock_contender_sequence};
    let below = |root: &str| path.strip_prefix(root).and_then(|r| r.strip_prefix('/'));
    if let Some(rest) = below(REQUESTS_LOCK) {
        let mut parts = rest.split('/');
        return match (parts.next(), parts.next(), parts.next()) {
            (Some(id), None, None) => !id.is_empty(),
            (Some(_), Some(c), None) => lock_contender_sequence(c).is_some(),
            _ => false,
        };
    }
    let Some(rest) = below(NODES) else {
        return false;
    };
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(LOCK), None, None) => true,
        (Some(_), Some(LOCK), Some(c), None) => lock_contender_sequence(c).is_some(),
        _ => false,
    }
}

impl Cached {
    /// A lock znode known from its watch event only (see
    /// [`is_unread_lock`]): empty data, created and modified now by the
    /// local clock, and zero zxids, which [`TreeCache::replace`] takes as
    /// "not known" rather than as a different znode.
    pub fn unread(now_ms: i64) -> Self {
        Cached {
            data: Bytes::new(),
            stat: Stat {
                ctime: now_ms,
                mtime: now_ms,
                ..Stat::default()
            },
        }
    }
}

/// Converts the client's stat.
pub(crate) fn stat(s: &zk::Stat) -> Stat {
    Stat {
        version: s.version,
        czxid: s.czxid,
        mzxid: s.mzxid,
        ctime: s.ctime,
        mtime: s.mtime,
        ephemeral_owner: s.ephemeral_owner,
        num_children: s.num_children,
    }
}

/// The mirror of one subtree.
#[derive(Debug, Default)]
pub(crate) struct TreeCache {
    entries: BTreeMap<String, Cached>,
    /// Whether a full load has completed for the current session (until
    /// then the mirror may be missing records, or hold another session's).
    pub loaded: bool,
}

impl TreeCache {
    /// Records a znode's data as read after an event.
    pub fn upsert(&mut self, path: &str, cached: Cached) {
        match self.entries.get_mut(path) {
            Some(c) => *c = cached,
            None => {
                self.entries.insert(path.to_owned(), cached);
            }
        }
    }

    /// Records a znode unless the mirror holds a newer (or the same)
    /// change of it: after a reload, what one of our writes wrote may be
    /// older than what the load read.
    pub fn upsert_if_newer(&mut self, path: &str, cached: Cached) {
        match self.entries.get_mut(path) {
            Some(c) if c.stat.mzxid >= cached.stat.mzxid => {}
            Some(c) => *c = cached,
            None => {
                self.entries.insert(path.to_owned(), cached);
            }
        }
    }

    /// Records a znode unless the mirror has it already (with better data).
    pub fn insert_if_absent(&mut self, path: &str, cached: Cached) {
        if !self.entries.contains_key(path) {
            self.entries.insert(path.to_owned(), cached);
        }
    }

    /// Forgets a znode.
    pub fn remove(&mut self, path: &str) {
        self.entries.remove(path);
    }

    /// Number of cached znodes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Replaces everything with a fresh load and returns what changed, as
    /// events, so that subscribers hear about changes whose watch events
    /// were lost while disconnected (ZOOKEEPER-4698) or that belong to a
    /// new session (our expired ephemerals are gone).
    pub fn replace(&mut self, fresh: BTreeMap<String, Cached>) -> Vec<StoreEvent> {
        let mut events = Vec::new();
        for (path, old) in &self.entries {
            match fresh.get(path) {
                None => events.push(StoreEvent::Deleted(path.clone())),
                // Known from its event only: no zxid to compare.
                Some(_) if old.stat.czxid == 0 => {}
                Some(new) if new.stat.czxid != old.stat.czxid => {
                    events.push(StoreEvent::Deleted(path.clone()));
                    events.push(StoreEvent::Created(path.clone()));
                }
                Some(new) if new.stat.mzxid != old.stat.mzxid => {
                    events.push(StoreEvent::Changed(path.clone()))
                }
                Some(_) => {}
            }
        }
        for path in fresh.keys() {
            if !self.entries.contains_key(path) {
                events.push(StoreEvent::Created(path.clone()));
            }
        }
        self.entries = fresh;
        self.loaded = true;
        events
    }

    /// The record at `prefix` and all below it, sorted by path, with
    /// `num_children` counted from the mirror itself: a persistent
    /// recursive watch reports no child events, so a parent's stored stat
    /// goes stale when children come and go.
    pub fn scan(&self, prefix: &str) -> Vec<Entry> {
        let below = format!("{prefix}/");
        let mut out: Vec<Entry> = Vec::new();
        if let Some(c) = self.entries.get(prefix) {
            out.push(entry(prefix, c));
        }
        for (p, c) in self.entries.range(below.clone()..) {
            if !p.starts_with(&below) {
                break;
            }
            out.push(entry(p, c));
        }
        count_children(&mut out);
        out
    }
}

fn entry(path: &str, c: &Cached) -> Entry {
    Entry {
        path: path.to_owned(),
        data: c.data.clone(),
        stat: Stat {
            num_children: 0,
            ..c.stat
        },
    }
}

/// Sets each entry's `num_children` from the (complete, sorted) subtree.
fn count_children(entries: &mut [Entry]) {
    // By position, with borrowed keys: a pass scans tens of thousands of
    // entries, and an owned key per entry was most of a scan's cost.
    let mut counts = vec![0i32; entries.len()];
    {
        let position: std::collections::HashMap<&str, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_str(), i))
            .collect();
        for e in entries.iter() {
            let (parent, _) = nodepool_model::store::split_path(&e.path);
            if let Some(&i) = position.get(parent) {
                counts[i] += 1;
            }
        }
    }
    for (e, n) in entries.iter_mut().zip(counts) {
        e.stat.num_children = n;
    }
}

type DataRead = Result<(Vec<u8>, zk::Stat), zk::Error>;

/// Reads the subtree at `root` (missing root: empty), breadth first with
/// pipelined reads. Znodes deleted while loading are skipped; the watch
/// that was set up before the load reports them.
pub(crate) async fn load(
    client: &zk::Client,
    root: &str,
    traffic: &Traffic,
) -> Result<BTreeMap<String, Cached>, zk::Error> {
    let mut out = BTreeMap::new();
    let mut level = vec![root.to_owned()];
    while !level.is_empty() {
        let reads: Vec<(String, DataRead)> = futures::stream::iter(level)
            .map(|path| {
                traffic.read(path.len());
                let fut = client.get_data(&path);
                async move { (path, fut.await) }
            })
            .buffered(LOAD_IN_FLIGHT)
            .collect()
            .await;
        let mut parents = Vec::new();
        for (path, r) in reads {
            match r {
                Ok((data, st)) => {
                    traffic.received(data.len());
                    if st.num_children > 0 {
                        parents.push(path.clone());
                    }
                    out.insert(
                        path,
                        Cached {
                            data: Bytes::from(data),
                            stat: stat(&st),
                        },
                    );
                }
                Err(zk::Error::NoNode) => {}
                Err(zk::Error::NoAuth) => {
                    tracing::warn!(%path, "no permission to read; left out of the cache");
                }
                Err(e) => return Err(e),
            }
        }
        let lists: Vec<(String, Result<Vec<String>, zk::Error>)> = futures::stream::iter(parents)
            .map(|path| {
                traffic.read(path.len());
                let fut = client.list_children(&path);
                async move { (path, fut.await) }
            })
            .buffered(LOAD_IN_FLIGHT)
            .collect()
            .await;
        level = Vec::new();
        for (path, r) in lists {
            match r {
                Ok(children) => {
                    traffic.received(children.iter().map(String::len).sum());
                    let base = if path == "/" { "" } else { path.as_str() };
                    level.extend(children.into_iter().map(|c| format!("{base}/{c}")));
                }
                Err(zk::Error::NoNode | zk::Error::NoAuth) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(czxid: i64, mzxid: i64) -> Cached {
        Cached {
            data: Bytes::new(),
            stat: Stat {
                czxid,
                mzxid,
                ..Stat::default()
            },
        }
    }

    #[test]
    fn replace_reports_the_difference() {
        let mut t = TreeCache::default();
        t.replace(BTreeMap::from([
            ("/a".to_owned(), c(1, 1)),
            ("/a/gone".to_owned(), c(2, 2)),
            ("/a/same".to_owned(), c(3, 3)),
            ("/a/changed".to_owned(), c(4, 4)),
            ("/a/recreated".to_owned(), c(5, 5)),
        ]));
        let events = t.replace(BTreeMap::from([
            ("/a".to_owned(), c(1, 1)),
            ("/a/same".to_owned(), c(3, 3)),
            ("/a/changed".to_owned(), c(4, 9)),
            ("/a/recreated".to_owned(), c(8, 8)),
            ("/a/new".to_owned(), c(7, 7)),
        ]));
        assert_eq!(
            events,
            [
                StoreEvent::Changed("/a/changed".into()),
                StoreEvent::Deleted("/a/gone".into()),
                StoreEvent::Deleted("/a/recreated".into()),
                StoreEvent::Created("/a/recreated".into()),
                StoreEvent::Created("/a/new".into()),
            ]
        );
    }

    #[test]
    fn request_and_node_locks_are_not_read() {
        for p in [
            "/nodepool/requests-lock/200-0000000001",
            "/nodepool/requests-lock/200-0000000001/ab12__lock__0000000000",
            "/nodepool/nodes/0000000007/lock",
            "/nodepool/nodes/0000000007/lock/ab12__lock__0000000003",
        ] {
            assert!(is_unread_lock(p), "{p} should not be read");
        }
        for p in [
            "/nodepool/requests-lock",
            "/nodepool/requests/200-0000000001",
            "/nodepool/nodes/0000000007",
            "/nodepool/nodes/0000000007/lock/not-a-contender",
            "/nodepool/nodes/0000000007/other",
            "/nodepool/elections/stats/ab12__lock__0000000000",
            "/nodepool/images/ubuntu/builds/lock",
        ] {
            assert!(!is_unread_lock(p), "{p} should be read");
        }
    }

    #[test]
    fn a_lock_known_from_its_event_only_is_not_reported_changed_by_a_reload() {
        let mut t = TreeCache::default();
        t.replace(BTreeMap::from([("/a".to_owned(), c(1, 1))]));
        t.insert_if_absent("/a/lock", Cached::unread(5));
        t.insert_if_absent("/a", Cached::unread(5));
        assert_eq!(t.scan("/a")[0].stat.czxid, 1, "a read znode is kept");
        let events = t.replace(BTreeMap::from([
            ("/a".to_owned(), c(1, 1)),
            ("/a/lock".to_owned(), c(6, 6)),
        ]));
        assert!(events.is_empty(), "{events:?}");
        t.insert_if_absent("/a/gone", Cached::unread(5));
        let events = t.replace(BTreeMap::from([("/a".to_owned(), c(1, 1))]));
        assert_eq!(
            events,
            [
                StoreEvent::Deleted("/a/gone".into()),
                StoreEvent::Deleted("/a/lock".into())
            ]
        );
    }

    #[test]
    fn scan_counts_children_from_the_mirror() {
        let mut t = TreeCache::default();
        t.replace(BTreeMap::from([
            ("/a".to_owned(), c(1, 1)),
            ("/a/b".to_owned(), c(2, 2)),
            ("/a/b/c".to_owned(), c(3, 3)),
            ("/a/d".to_owned(), c(4, 4)),
            ("/ab".to_owned(), c(5, 5)),
        ]));
        let s = t.scan("/a");
        let got: Vec<(&str, i32)> = s
            .iter()
            .map(|e| (e.path.as_str(), e.stat.num_children))
            .collect();
        assert_eq!(got, [("/a", 2), ("/a/b", 1), ("/a/b/c", 0), ("/a/d", 0)]);
        assert!(t.scan("/zz").is_empty());
    }
}
