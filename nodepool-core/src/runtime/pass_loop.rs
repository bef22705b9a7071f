//! The loop every runtime runs: a pass, then a wait for a reason to pass
//! again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::PassCounter;
use crate::config::Config;
use crate::store::{SessionState, StateStore, StoreEvent};

/// How a pass ended, when it did not stop the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Passed {
    /// It planned and executed: counted by the [`PassCounter`].
    Completed,
    /// It could not plan (the session is suspended, the store failed; the
    /// runtime logged why): not counted.
    Skipped,
}

/// A runtime as the loop sees it.
pub(crate) trait PassRunner: Send {
    /// An error that stops the runtime.
    type Fatal: Send;

    /// One pass: snapshot, plan, execute. Errors the next pass may get
    /// past are the runtime's to log; they end the pass as
    /// [`Passed::Skipped`].
    fn pass(&mut self) -> impl Future<Output = Result<Passed, Self::Fatal>> + Send;

    /// Takes a new configuration (a reload); the next pass plans with it.
    fn reload(&mut self, config: Arc<Config>) -> impl Future<Output = ()> + Send;
}

/// What makes the loop pass again besides shutdown and reloads.
pub(crate) struct Wakeups<'a> {
    /// Longest time between two passes (time-based rules need a pass).
    pub max_interval: Duration,
    /// Shortest time between two passes: a burst of events is coalesced
    /// into one pass.
    pub min_interval: Duration,
    /// A store whose changes and session changes start a pass.
    pub store: Option<&'a Arc<dyn StateStore>>,
    /// Which changed paths of `store` concern the runtime.
    pub relevant: fn(&str) -> bool,
    /// Notified by the runtime's tasks when they end.
    pub wake: Option<&'a Notify>,
}

impl Wakeups<'_> {
    /// Every change is relevant.
    pub(crate) fn any_path(_: &str) -> bool {
        true
    }
}

/// Runs passes until `shutdown` is cancelled or a pass fails fatally; a
/// new value on `config` is handed to [`PassRunner::reload`] and followed
/// by a pass. Every completed pass is counted on `passes`, which is marked
/// stopped when the loop ends.
pub(crate) async fn run_passes<R: PassRunner>(
    runner: &mut R,
    wakeups: Wakeups<'_>,
    config: &mut watch::Receiver<Arc<Config>>,
    shutdown: &CancellationToken,
    passes: &PassCounter,
) -> Result<(), R::Fatal> {
    let mut events = wakeups.store.map(|s| s.subscribe());
    let mut session = wakeups.store.map(|s| s.session());
    // Once the configuration's sender is gone there are no reloads, and
    // `changed` would end at once on every wait.
    let mut reloads = true;
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        match runner.pass().await {
            Ok(Passed::Completed) => passes.completed(),
            Ok(Passed::Skipped) => {}
            Err(fatal) => break Err(fatal),
        }
        let tick = tokio::time::sleep(wakeups.max_interval);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = &mut tick => break,
                _ = notified(wakeups.wake) => break,
                r = next_event(&mut events) => match r {
                    Ok(ev) if !(wakeups.relevant)(ev.path()) => continue,
                    Err(RecvError::Closed) => {
                        events = wakeups.store.map(|s| s.subscribe());
                        break;
                    }
                    _ => break,
                },
                r = config.changed(), if reloads => {
                    match r {
                        Ok(()) => {
                            let cfg = config.borrow_and_update().clone();
                            runner.reload(cfg).await;
                        }
                        Err(_) => reloads = false,
                    }
                    break;
                }
                r = session_changed(&mut session) => {
                    if r.is_err() {
                        // The store is gone; its events will tell.
                        session = None;
                    }
                    break;
                }
            }
        }
        if !wakeups.min_interval.is_zero() {
            tokio::time::sleep(wakeups.min_interval).await;
        }
        if let Some(rx) = &mut events {
            while rx.try_recv().is_ok() {}
        }
    };
    passes.stopped();
    result
}

async fn notified(wake: Option<&Notify>) {
    match wake {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

async fn next_event(
    events: &mut Option<broadcast::Receiver<StoreEvent>>,
) -> Result<StoreEvent, RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn session_changed(
    session: &mut Option<watch::Receiver<SessionState>>,
) -> Result<(), watch::error::RecvError> {
    match session {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::{CreateMode, MemoryStore};

    /// A runtime that records what the loop asks of it.
    #[derive(Default)]
    struct Recorder {
        seen: Arc<Mutex<Seen>>,
        /// What each pass answers, in turn; then `Completed`.
        script: Vec<Result<Passed, &'static str>>,
    }

    #[derive(Default)]
    struct Seen {
        passes: u32,
        reloads: u32,
    }

    impl PassRunner for Recorder {
        type Fatal = &'static str;

        async fn pass(&mut self) -> Result<Passed, &'static str> {
            self.seen.lock().expect("seen").passes += 1;
            if self.script.is_empty() {
                Ok(Passed::Completed)
            } else {
                self.script.remove(0)
            }
        }

        async fn reload(&mut self, _config: Arc<Config>) {
            self.seen.lock().expect("seen").reloads += 1;
        }
    }

    struct Running {
        seen: Arc<Mutex<Seen>>,
        passes: PassCounter,
        config: watch::Sender<Arc<Config>>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), &'static str>>,
    }

    impl Running {
        fn passes_run(&self) -> u32 {
            self.seen.lock().expect("seen").passes
        }

        fn reloads(&self) -> u32 {
            self.seen.lock().expect("seen").reloads
        }

        async fn stop(self) -> Result<(), &'static str> {
            self.shutdown.cancel();
            let r = self.task.await.expect("loop task");
            assert!(self.passes.is_stopped());
            r
        }
    }

    fn empty_config() -> Arc<Config> {
        Arc::new(Config::from_yaml("labels: []\n").expect("valid config"))
    }

    /// Only paths under `/watched` concern the test runtime.
    fn watched(path: &str) -> bool {
        path.starts_with("/watched")
    }

    /// Runs the loop with a tick of an hour, so nothing but the test's
    /// own doing starts a pass.
    fn start(
        store: Option<Arc<dyn StateStore>>,
        script: Vec<Result<Passed, &'static str>>,
    ) -> Running {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut runner = Recorder {
            seen: seen.clone(),
            script,
        };
        let passes = PassCounter::default();
        let (config, mut rx) = watch::channel(empty_config());
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let task = {
            let (passes, wake, shutdown) = (passes.clone(), wake.clone(), shutdown.clone());
            tokio::spawn(async move {
                let wakeups = Wakeups {
                    max_interval: Duration::from_secs(3600),
                    min_interval: Duration::from_millis(5),
                    store: store.as_ref(),
                    relevant: watched,
                    wake: Some(&wake),
                };
                run_passes(&mut runner, wakeups, &mut rx, &shutdown, &passes).await
            })
        };
        Running {
            seen,
            passes,
            config,
            wake,
            shutdown,
            task,
        }
    }

    /// Lets every task run until all wait on timers less than `d` away
    /// (paused clock: virtual time).
    async fn settle(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn completed_passes_are_counted_and_skipped_ones_are_not() {
        let r = start(
            None,
            vec![
                Ok(Passed::Skipped),
                Ok(Passed::Completed),
                Ok(Passed::Skipped),
            ],
        );
        // The first pass runs at once, the others one tick apart.
        assert_eq!(r.passes.reached(2).await, Ok(2));
        assert_eq!(r.passes_run(), 4);
        r.stop().await.expect("no fatal error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_error_ends_the_loop_and_the_wait() {
        let r = start(None, vec![Ok(Passed::Completed), Err("newer model")]);
        assert_eq!(
            r.passes.more(5).await,
            Err(crate::runtime::RuntimeStopped { count: 1 })
        );
        assert_eq!(r.stop().await, Err("newer model"));
    }

    #[tokio::test(start_paused = true)]
    async fn relevant_changes_wakes_and_reloads_start_a_pass_and_nothing_else_does() {
        let mem = MemoryStore::new();
        let store: Arc<dyn StateStore> = Arc::new(mem.new_session());
        let r = start(Some(store.clone()), Vec::new());
        r.passes.reached(1).await.expect("first pass");
        // A change elsewhere in the store: no pass within a minute.
        store
            .create("/elsewhere/a", b"", CreateMode::Persistent)
            .await
            .expect("create");
        settle(Duration::from_secs(60)).await;
        assert_eq!(r.passes.count(), 1);
        // A relevant change, a task's wake-up, a reload: one pass each.
        store
            .create("/watched/a", b"", CreateMode::Persistent)
            .await
            .expect("create");
        assert_eq!(r.passes.reached(2).await, Ok(2));
        r.wake.notify_one();
        assert_eq!(r.passes.reached(3).await, Ok(3));
        r.config.send(empty_config()).expect("loop listens");
        assert_eq!(r.passes.reached(4).await, Ok(4));
        assert_eq!(r.reloads(), 1);
        settle(Duration::from_secs(60)).await;
        assert_eq!(r.passes.count(), 4, "nothing else happened");
        // The tick passes again.
        settle(Duration::from_secs(3600)).await;
        assert_eq!(r.passes.count(), 5);
        r.stop().await.expect("no fatal error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_pass() {
        let mem = MemoryStore::new();
        let store: Arc<dyn StateStore> = Arc::new(mem.new_session());
        let r = start(Some(store.clone()), Vec::new());
        r.passes.reached(1).await.expect("first pass");
        for i in 0..20 {
            store
                .create(&format!("/watched/{i}"), b"", CreateMode::Persistent)
                .await
                .expect("create");
        }
        settle(Duration::from_secs(60)).await;
        assert_eq!(r.passes.count(), 2);
        r.stop().await.expect("no fatal error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_configuration_sender_does_not_spin_the_loop() {
        let r = start(None, Vec::new());
        r.passes.reached(1).await.expect("first pass");
        let Running {
            seen,
            passes,
            config,
            wake,
            shutdown,
            task,
        } = r;
        drop(config);
        settle(Duration::from_secs(60)).await;
        // One pass for noticing, none after.
        assert!(passes.count() <= 2, "{} passes", passes.count());
        let r = Running {
            seen,
            passes,
            config: watch::channel(empty_config()).0,
            wake,
            shutdown,
            task,
        };
        r.stop().await.expect("no fatal error");
    }
}
