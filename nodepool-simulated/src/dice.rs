//! How the simulated cloud fails on its own: the failure dice (each create,
//! delete and upload rolls a die from its own splitmix64 stream seeded by
//! `seed`, so the n-th create of a run fails or not whatever the other
//! operations did) and the API fault every call goes through
//! ([`SimulatedProvider::api`]: `hang`, `server-error`, `rate-limit`).

use std::time::Duration;

use tokio::time::Instant;

use nodepool_model::config::ApiFault;
use nodepool_model::provider::ProviderError;

use crate::SimulatedProvider;
use crate::nova::State;
use crate::storage::Stamp;

/// The fault of a server whose create failed by the dice.
pub(crate) const CREATE_FAULT: &str =
    "simulated create failure: No valid host was found. There are not enough hosts available.";

/// The fault of a server whose delete failed by the dice.
pub(crate) const DELETE_FAULT: &str = "simulated delete failure: error while deleting the server";

/// How often a hung call looks whether the fault was cleared.
const HANG_POLL: Duration = Duration::from_millis(100);

/// Probabilities (0 to 1) that a create, delete or upload fails.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FailureRates {
    /// A server create: the server goes ERROR instead of ACTIVE.
    pub create: f64,
    /// A server delete: the server goes ERROR instead of away.
    pub delete: f64,
    /// An image upload: no image is left.
    pub upload: f64,
}

impl FailureRates {
    pub(crate) fn clamped(self) -> Self {
        let c = |p: f64| if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        FailureRates {
            create: c(self.create),
            delete: c(self.delete),
            upload: c(self.upload),
        }
    }
}

/// splitmix64: tiny, fast and good enough for failure dice; no crate needed.
/// Its one word is the stream's position, kept in the state file.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    /// Stream `stream` of `seed`: streams start far apart, so rolls in one
    /// do not shift the others.
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        let mut s = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next_u64();
        s
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`. Always draws, so the n-th roll of a
    /// stream is the same whatever the rates were before it.
    pub(crate) fn roll(&mut self, p: f64) -> bool {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        u < p
    }

    /// A UUID-shaped id (version 4 layout), as Nova and Glance give.
    pub(crate) fn uuid(&mut self) -> String {
        let hi = u128::from(self.next_u64());
        let lo = u128::from(self.next_u64());
        let bytes = ((hi << 64) | lo).to_be_bytes();
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }
}

impl SimulatedProvider {
    /// One API call: `f` on the state (see [`crate::storage`]) behind the
    /// API fault, if any (see the crate documentation). A hung call looks
    /// again every [`HANG_POLL`] and goes through once the fault is
    /// cleared, unless `api-timeout` passed first.
    pub(crate) async fn api<R, F>(&self, what: &str, f: F) -> Result<R, ProviderError>
    where
        F: FnOnce(&mut State, Stamp) -> R + Send,
    {
        /// What one look found.
        enum Gate<R> {
            Done(R),
            Fault(ApiFault),
        }
        let started = Instant::now();
        let mut f = Some(f);
        loop {
            let gate = self
                .with_state(|st, now| match (st.api_fault, f.take()) {
                    (None, Some(f)) => Ok(Gate::Done(f(st, now))),
                    (Some(fault), f_back) => {
                        // Not spent: the next look may go through.
                        f = f_back;
                        Ok(Gate::Fault(fault))
                    }
                    (None, None) => Err(ProviderError::Other(format!(
                        "provider {}: {what}: simulated call made twice",
                        self.inner.nova.name
                    ))),
                })
                .await??;
            let fault = match gate {
                Gate::Done(r) => return Ok(r),
                Gate::Fault(fault) => fault,
            };
            let name = &self.inner.nova.name;
            match fault {
                ApiFault::ServerError => {
                    return Err(ProviderError::Transient(format!(
                        "provider {name}: {what}: HTTP 500 Internal Server Error (simulated API fault)"
                    )));
                }
                ApiFault::RateLimit { retry_after } => {
                    return Err(ProviderError::RateLimited {
                        message: format!(
                            "provider {name}: {what}: HTTP 429 Too Many Requests (simulated API fault{})",
                            retry_after
                                .map(|d| format!(", Retry-After: {}", d.as_secs()))
                                .unwrap_or_default()
                        ),
                        retry_after,
                    });
                }
                ApiFault::Hang => {
                    let limit = self.inner.api_timeout;
                    let left = limit.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(ProviderError::Timeout(format!(
                            "provider {name}: {what}: no answer within {:.1} s (simulated API hang)",
                            limit.as_secs_f64()
                        )));
                    }
                    tokio::time::sleep(left.min(HANG_POLL)).await;
                }
            }
        }
    }

    /// Makes every API call fail as `fault` says, or work again with
    /// `None`. With a state file, every process's provider of this cloud
    /// sees it at its next call.
    pub async fn set_api_fault(&self, fault: Option<ApiFault>) {
        self.hook("set_api_fault", |st, _| st.api_fault = fault)
            .await;
    }

    /// How the API fails now, if it does.
    pub async fn api_fault(&self) -> Option<ApiFault> {
        self.hook("api_fault", |st, _| st.api_fault).await
    }

    /// Replaces the failure rates (each clamped to 0..=1). The dice streams
    /// carry on where they were. With a state file, a provider that opens
    /// the file later applies its configuration's rates again.
    pub async fn set_failure_rates(&self, rates: FailureRates) {
        self.hook("set_failure_rates", |st, _| st.rates = rates.clamped())
            .await;
    }

    /// The current failure rates.
    pub async fn failure_rates(&self) -> FailureRates {
        self.hook("failure_rates", |st, _| st.rates).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_are_reproducible_and_fair() {
        let mut a = SplitMix64::new(7, 1);
        let mut b = SplitMix64::new(7, 1);
        let rolls_a: Vec<bool> = (0..100).map(|_| a.roll(0.3)).collect();
        let rolls_b: Vec<bool> = (0..100).map(|_| b.roll(0.3)).collect();
        assert_eq!(rolls_a, rolls_b);
        let mut c = SplitMix64::new(7, 2);
        let hits = (0..10_000).filter(|_| c.roll(0.3)).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| !c.roll(0.0)));
        assert!((0..1000).all(|_| c.roll(1.0)));
    }
}
