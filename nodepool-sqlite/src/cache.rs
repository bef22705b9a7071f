//! An in-process copy of the whole tree, kept fresh from the change feed,
//! so that `scan` (a planning pass lists every node and request) costs a
//! copy of what changed rather than a read of every row.
//!
//! Freshness: before answering, the cache catches up to the file's current
//! change id inside one read transaction, so a scan sees every write
//! committed before it started (ours and other processes'), exactly as a
//! direct read would. The worker thread also catches it up whenever the
//! feed moves, so that catch-up is usually empty.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use nodepool_model::store::{Entry, Stat, split_path};
use rusqlite::Connection;

use crate::db::{self, ChangeKind, DbError, Malformed};

#[derive(Debug, Default)]
pub(crate) struct Cache {
    /// Whether `records` holds the tree (loaded on first use).
    loaded: bool,
    /// The change id the copy reflects.
    zxid: i64,
    records: BTreeMap<String, (Bytes, Stat)>,
}

fn warn_malformed(bad: &[Malformed]) {
    for m in bad {
        tracing::warn!(path = %m.path, reason = %m.reason, "skipping malformed record row");
    }
}

impl Cache {
    /// Whether the tree has been loaded (the worker only refreshes a
    /// loaded cache; a process that never scans never pays for one).
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded
    }

    fn reload(&mut self, conn: &Connection) -> Result<(), DbError> {
        let zxid = db::current_zxid(conn)?;
        let (rows, bad) = db::scan(conn, "/")?;
        warn_malformed(&bad);
        self.records = rows
            .into_iter()
            .map(|r| (r.path, (r.data, r.stat)))
            .collect();
        self.zxid = zxid;
        self.loaded = true;
        Ok(())
    }

    /// Brings the copy up to the file's current change id.
    pub(crate) fn refresh(&mut self, conn: &mut Connection) -> Result<(), DbError> {
        // One read transaction: the change list and the rows re-read for it
        // come from the same snapshot.
        let tx = conn.transaction()?;
        if !self.loaded {
            self.reload(&tx)?;
            return Ok(());
        }
        let max = db::current_zxid(&tx)?;
        if max == self.zxid {
            return Ok(());
        }
        let changes = db::changes_since(&tx, self.zxid)?;
        let dense = max > self.zxid
            && db::oldest_change(&tx)?.is_some_and(|oldest| oldest <= self.zxid + 1);
        if !dense {
            // Changes we never saw were pruned (this process stalled for
            // longer than the retention), or the file was replaced.
            tracing::info!(
                from = self.zxid,
                to = max,
                "change feed has a gap; reloading the tree"
            );
            self.reload(&tx)?;
            return Ok(());
        }
        let mut touched = BTreeSet::new();
        for c in &changes {
            touched.insert(c.path.as_str());
            if c.kind != ChangeKind::Changed {
                // The parent's child count changed.
                touched.insert(split_path(&c.path).0);
            }
        }
        for path in touched {
            match db::get(&tx, path)? {
                Some(Ok(r)) => {
                    self.records.insert(r.path, (r.data, r.stat));
                }
                Some(Err(m)) => {
                    warn_malformed(std::slice::from_ref(&m));
                    self.records.remove(path);
                }
                None => {
                    self.records.remove(path);
                }
            }
        }
        self.zxid = max;
        Ok(())
    }

    /// The record at `prefix` and everything below it, sorted by path.
    pub(crate) fn scan(&self, prefix: &str) -> Vec<Entry> {
        let entry = |(path, (data, stat)): (&String, &(Bytes, Stat))| Entry {
            path: path.clone(),
            data: data.clone(),
            stat: *stat,
        };
        if prefix == "/" {
            return self.records.iter().map(entry).collect();
        }
        let below = format!("{prefix}/");
        self.records
            .get_key_value(prefix)
            .into_iter()
            .chain(
                self.records
                    .range::<str, _>((
                        std::ops::Bound::Included(below.as_str()),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|(p, _)| p.starts_with(&below)),
            )
            .map(entry)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use nodepool_model::store::CreateMode;

    use super::*;
    use crate::db::{Txn, connect, init};
    use crate::options::SqliteOptions;

    fn write(conn: &mut Connection, f: impl FnOnce(&mut Txn<'_>)) {
        let mut t = Txn::begin(conn).expect("begin");
        f(&mut t);
        t.commit().expect("commit");
    }

    fn paths(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn follows_writes_of_another_connection_and_reloads_after_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.db");
        let mut writer = connect(&file, &SqliteOptions::default()).expect("open");
        init(&mut writer, std::time::Duration::from_secs(5)).expect("init");
        let mut reader = connect(&file, &SqliteOptions::default()).expect("open");
        let mut cache = Cache::default();
        write(&mut writer, |t| {
            t.create(0, "/n/a", b"1", CreateMode::Persistent)
                .expect("create");
        });
        cache.refresh(&mut reader).expect("refresh");
        assert_eq!(paths(&cache.scan("/n")), ["/n", "/n/a"]);
        write(&mut writer, |t| {
            t.create(0, "/n/b", b"2", CreateMode::Persistent)
                .expect("create");
            t.set("/n/a", b"3", None).expect("set");
        });
        cache.refresh(&mut reader).expect("refresh");
        let got = cache.scan("/n");
        assert_eq!(paths(&got), ["/n", "/n/a", "/n/b"]);
        assert_eq!(&got[1].data[..], b"3");
        assert_eq!(got[0].stat.num_children, 2, "the parent's stat follows");
        // A gap: the feed entries we have not seen are pruned.
        write(&mut writer, |t| {
            t.delete("/n/b", None).expect("delete");
            t.create(0, "/n/c", b"", CreateMode::Persistent)
                .expect("create");
        });
        writer
            .execute("DELETE FROM changes", [])
            .expect("prune everything");
        cache.refresh(&mut reader).expect("refresh");
        assert_eq!(paths(&cache.scan("/n")), ["/n", "/n/a", "/n/c"]);
        assert_eq!(paths(&cache.scan("/n/a")), ["/n/a"]);
        assert!(cache.scan("/n/zz").is_empty());
    }
}
