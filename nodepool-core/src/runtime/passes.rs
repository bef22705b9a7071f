//! Counting a runtime's completed passes, so that whoever needs "the
//! runtime looked again and still did nothing" waits for passes instead of
//! sleeping for a guessed while.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, Default)]
struct State {
    count: u64,
    stopped: bool,
}

/// The passes a runtime completed (planned and executed), readable and
/// awaitable while it runs. Cheap to clone; clones share the count.
///
/// A pass that could not plan (the store session suspended, the store
/// failing) is not counted: a counted pass is one that saw a snapshot and
/// acted on it.
#[derive(Clone, Debug)]
pub struct PassCounter {
    tx: Arc<watch::Sender<State>>,
}

/// The runtime stopped before the passes waited for completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the runtime stopped after {count} passes")]
pub struct RuntimeStopped {
    /// Passes it completed.
    pub count: u64,
}

impl Default for PassCounter {
    fn default() -> Self {
        PassCounter {
            tx: Arc::new(watch::Sender::new(State::default())),
        }
    }
}

impl PassCounter {
    /// Passes completed so far.
    pub fn count(&self) -> u64 {
        self.tx.borrow().count
    }

    /// Whether the runtime's loop has ended.
    pub fn is_stopped(&self) -> bool {
        self.tx.borrow().stopped
    }

    /// Waits until `n` passes completed in all; returns the count then.
    pub async fn reached(&self, n: u64) -> Result<u64, RuntimeStopped> {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let st = match rx.wait_for(|s| s.count >= n || s.stopped).await {
            Ok(st) => *st,
            Err(_) => *self.tx.borrow(),
        };
        if st.count >= n {
            Ok(st.count)
        } else {
            Err(RuntimeStopped { count: st.count })
        }
    }

    /// Waits for `n` more passes to complete; returns the count then.
    ///
    /// The first of them may have been running already, reading a
    /// snapshot taken before this call: to be sure a pass saw what was
    /// done before the call, wait for two.
    pub async fn more(&self, n: u64) -> Result<u64, RuntimeStopped> {
        let target = self.count().saturating_add(n);
        self.reached(target).await
    }

    /// Counts a completed pass.
    pub(crate) fn completed(&self) {
        self.tx.send_modify(|s| s.count += 1);
    }

    /// Marks the loop ended: waiters stop waiting.
    pub(crate) fn stopped(&self) {
        self.tx.send_modify(|s| s.stopped = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_see_passes_and_the_end() {
        let passes = PassCounter::default();
        // `more` takes its target when first polled, before the passes.
        let (seen, ()) = tokio::join!(passes.more(2), async {
            passes.completed();
            passes.completed();
        });
        assert_eq!(seen, Ok(2));
        assert_eq!(passes.reached(1).await, Ok(2), "already reached");
        let (seen, ()) = tokio::join!(passes.more(5), async {
            passes.completed();
            passes.stopped();
        });
        assert_eq!(seen, Err(RuntimeStopped { count: 3 }));
        assert!(passes.is_stopped());
    }
}
