//! The server's clock: Unix-epoch milliseconds at start plus monotonic time elapsed since.
//!
//! Within one run it never goes backwards (a wall-clock jump does not expire leases early);
//! anchored to the epoch so the expiries persisted by one run mean the same instant to the next.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Monotonic, epoch-anchored milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch_start_ms: u64,
    start: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// Anchor now.
    #[must_use]
    pub fn new() -> Self {
        let epoch_start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            epoch_start_ms,
            start: Instant::now(),
        }
    }

    /// Current time in epoch milliseconds.
    #[must_use]
    pub fn now_ms(&self) -> u64 {
        self.epoch_start_ms
            + u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }

    /// The instant at which [`Clock::now_ms`] reaches `ms`.
    #[must_use]
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms.saturating_sub(self.epoch_start_ms))
    }
}
