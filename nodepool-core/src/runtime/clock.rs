//! Where a runtime's "now" comes from.

use crate::model::epoch_now;

/// A runtime's notion of the current time (epoch seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clock {
    /// The system clock.
    System,
    /// Epoch time advanced by tokio's clock from a start point, so tests on
    /// tokio's paused clock see time-based rules (max-ready-age,
    /// max-hold-age, build backoffs) fire as virtual time passes.
    Tokio {
        /// Epoch seconds at `start`.
        epoch: f64,
        /// The tokio instant the epoch was taken.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A tokio-driven clock starting now.
    pub fn tokio() -> Self {
        Clock::Tokio {
            epoch: epoch_now(),
            start: tokio::time::Instant::now(),
        }
    }

    /// The current time in epoch seconds.
    pub fn now(&self) -> f64 {
        match self {
            Clock::System => epoch_now(),
            Clock::Tokio { epoch, start } => epoch + start.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_virtual_time() {
        let clock = Clock::tokio();
        let t0 = clock.now();
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        let elapsed = clock.now() - t0;
        assert!((elapsed - 3600.0).abs() < 1e-3, "{elapsed}");
    }
}
