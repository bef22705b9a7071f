//! Where a simulated cloud's [`State`] lives and where its time comes
//! from: in this process's memory on tokio's clock (tests on a paused
//! clock are exact), or in a state file shared by processes on the wall
//! clock (`file`: locking and atomic replacement; `format`: the JSON).
//!
//! Every operation runs a closure on the state under the cloud's one lock
//! ([`Storage::with_state`]); nothing holds the state across an `.await`,
//! and state changes are computed from the clock when the cloud is next
//! looked at, so a cancelled or killed caller never leaves a server
//! half-way.

mod file;
mod format;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::futures::OwnedNotified;
use tokio::time::Instant;

use nodepool_model::provider::ProviderError;

use crate::nova::{Nova, State};
use file::StateFile;
use format::{FILE_VERSION, FileCloud};

/// How often a file-backed cloud is read again while waiting for a server:
/// another process may fail or delete it, and nothing wakes us then.
const FILE_POLL: Duration = Duration::from_millis(20);

/// A time on the cloud's clock: how long after the clock's origin.
pub(crate) type Stamp = Duration;

/// Where the cloud's "now" comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Clock {
    /// tokio's clock, counted from when the cloud was made. In memory, so
    /// tests on a paused clock are exact.
    Tokio(Instant),
    /// The wall clock, counted from the Unix epoch. A state file is shared
    /// by processes, and processes share no tokio clock.
    Wall,
}

impl Clock {
    pub(crate) fn now(self) -> Stamp {
        match self {
            Clock::Tokio(origin) => Instant::now().saturating_duration_since(origin),
            // A system clock before 1970 is not worth an error: the cloud's
            // time then stands still at the epoch.
            Clock::Wall => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// Waits until `until` or `changed` fires. On the wall clock (a state
    /// file) it waits at most [`FILE_POLL`]: changes made by another
    /// process wake nobody, so the caller looks again.
    pub(crate) async fn pause(self, until: Stamp, changed: Option<OwnedNotified>) {
        match self {
            Clock::Tokio(origin) => {
                let sleep = tokio::time::sleep_until(origin + until);
                match changed {
                    Some(changed) => {
                        tokio::select! {
                            _ = sleep => {}
                            _ = changed => {}
                        }
                    }
                    None => sleep.await,
                }
            }
            Clock::Wall => {
                let left = until.saturating_sub(self.now());
                tokio::time::sleep(left.min(FILE_POLL)).await;
            }
        }
    }
}

/// Where the state lives.
// One per provider, behind its `Arc`: boxing the in-memory state would only
// add an indirection to every operation of the hot (benchmark) path.
#[allow(clippy::large_enum_variant)]
enum Backing {
    /// In this process's memory.
    Memory(Mutex<State>),
    /// In a state file shared by processes.
    File(StateFile),
}

/// A cloud's state and clock.
pub(crate) struct Storage {
    pub(crate) clock: Clock,
    backing: Backing,
}

impl Storage {
    /// In memory (a fresh cloud made now from `nova`'s seed), or in
    /// `state_file` (opened by the first operation).
    pub(crate) fn new(nova: &Nova, state_file: Option<PathBuf>) -> Self {
        match state_file {
            Some(path) => Storage {
                clock: Clock::Wall,
                backing: Backing::File(StateFile::new(path)),
            },
            None => {
                let clock = Clock::Tokio(Instant::now());
                Storage {
                    clock,
                    backing: Backing::Memory(Mutex::new(nova.fresh_state(clock.now()))),
                }
            }
        }
    }

    /// The state file, when the cloud lives in one.
    pub(crate) fn state_file(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Memory(_) => None,
            Backing::File(file) => Some(&file.path),
        }
    }

    /// Servers in memory, for `Debug` (no file I/O, and no way to fail).
    pub(crate) fn servers_in_memory(&self) -> Option<usize> {
        match &self.backing {
            Backing::Memory(m) => Some(m.lock().unwrap_or_else(|e| e.into_inner()).servers.len()),
            Backing::File(_) => None,
        }
    }

    /// Runs `f` on the state under the cloud's lock (the process's mutex,
    /// or the state file's lock with a read before and a write after).
    pub(crate) async fn with_state<R, F>(&self, nova: &Nova, f: F) -> Result<R, ProviderError>
    where
        F: FnOnce(&mut State, Stamp) -> R + Send,
    {
        match &self.backing {
            Backing::Memory(m) => {
                let now = self.clock.now();
                // A panic while holding the lock cannot leave the maps
                // inconsistent in a way that matters more than losing the
                // whole cloud would.
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                Ok(f(&mut st, now))
            }
            Backing::File(file) => {
                let _lock = file.lock_async().await?;
                self.run_on_file(nova, file, f)
            }
        }
    }

    /// [`with_state`](Self::with_state) for synchronous callers.
    pub(crate) fn with_state_blocking<R>(
        &self,
        nova: &Nova,
        f: impl FnOnce(&mut State, Stamp) -> R,
    ) -> Result<R, ProviderError> {
        match &self.backing {
            Backing::Memory(m) => {
                let now = self.clock.now();
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                Ok(f(&mut st, now))
            }
            Backing::File(file) => {
                let _lock = file.lock_blocking()?;
                self.run_on_file(nova, file, f)
            }
        }
    }

    /// One operation on a file-backed cloud, the caller holding the file
    /// lock: read, (on this provider's first operation) apply the
    /// configuration, run `f`, write back if anything changed.
    fn run_on_file<R>(
        &self,
        nova: &Nova,
        file: &StateFile,
        f: impl FnOnce(&mut State, Stamp) -> R,
    ) -> Result<R, ProviderError> {
        let (before, mut doc) = file.read()?;
        let now = self.clock.now();
        let first = !file.opened.load(Ordering::Acquire);
        let mut st = match doc.providers.get(&nova.name) {
            Some(cloud) => {
                let mut st = cloud
                    .to_state()
                    .map_err(|e| file.io_error("reading", &file.path, e))?;
                if first {
                    // The configuration describes the cloud: the latest
                    // one to open the file wins quota and failure rates.
                    st.quota = nova.seed.quota.clone();
                    st.rates = nova.seed.rates;
                    st.ensure_cloud_images(&nova.seed.cloud_images);
                    // Only a configured fault: a process opening the file
                    // must not clear one a drill set at run time.
                    if nova.seed.api_fault.is_some() {
                        st.api_fault = nova.seed.api_fault;
                    }
                }
                st
            }
            None => nova.fresh_state(now),
        };
        let out = f(&mut st, now);
        doc.version = FILE_VERSION;
        doc.providers
            .insert(nova.name.clone(), FileCloud::from_state(&st));
        let mut after = serde_json::to_vec_pretty(&doc)
            .map_err(|e| file.io_error("encoding", &file.path, e))?;
        after.push(b'\n');
        if after != before {
            file.write(&after)?;
        }
        file.opened.store(true, Ordering::Release);
        Ok(out)
    }
}
