//! The one way the bridge retries an internal step until it succeeds (a dedupe store call, a
//! sent mark, a dead-letter write, a draw from the shared rate budget in Redis): doubling delays
//! from `initial` up to `max`, for ever, or until shutdown's deadline fires. Built on `backon`'s exponential backoff. (Requests to the API have a
//! policy of their own, with full jitter, `Retry-After` and the rate budget: `deliver`.)

use backon::{ExponentialBuilder, Retryable};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Delays between tries: `initial`, then doubled each time, never more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The dedupe store (checks, delivered ids, sent marks): 100 ms doubling to 5 s.
    pub const STORE: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };
    /// Draws from the shared rate budget in Redis while Redis does not answer: every 500 ms, not
    /// doubling (the key's requests all wait on it; a draw is one small script).
    pub const RATE_BUDGET: Backoff = Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_millis(500),
    };
    /// Dead-letter writes to the broker: 100 ms doubling to 10 s.
    pub const DEAD_LETTER: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };
}

/// Runs `op` until it returns `Ok`, waiting per `backoff` between tries and telling `on_error`
/// each failure with the delay before the next try. `None` when `cancel` fires first (the try
/// under way is dropped); without a `cancel`, it only ends with the value.
pub async fn until_ok<T, E, Fut>(
    backoff: Backoff,
    cancel: Option<&CancellationToken>,
    op: impl FnMut() -> Fut,
    on_error: impl FnMut(&E, Duration),
) -> Option<T>
where
    Fut: Future<Output = Result<T, E>>,
{
    let policy = ExponentialBuilder::new()
        .with_min_delay(backoff.initial)
        .with_max_delay(backoff.max)
        .with_factor(2.0)
        .without_max_times();
    let tries = op.retry(policy).sleep(tokio::time::sleep).notify(on_error);
    match cancel {
        // Without a limit on tries, `tries` ends only with `Ok`.
        Some(cancel) => tokio::select! {
            r = tries => r.ok(),
            _ = cancel.cancelled() => None,
        },
        None => tries.await.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn delays_double_up_to_the_cap_until_the_step_succeeds() {
        let tries = AtomicU32::new(0);
        let mut delays = Vec::new();
        let start = tokio::time::Instant::now();
        let v = until_ok(
            Backoff::STORE,
            None,
            || async {
                match tries.fetch_add(1, Ordering::Relaxed) {
                    0..=7 => Err("store unreachable"),
                    _ => Ok(42),
                }
            },
            |_: &&str, d| delays.push(d.as_millis()),
        )
        .await;
        assert_eq!(v, Some(42));
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // The paused clock's timer wheel rounds each sleep up to the next millisecond.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(16_300) && waited < Duration::from_millis(16_310),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_the_retries_without_a_value() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.cancel();
        });
        let v: Option<()> = until_ok(
            Backoff::DEAD_LETTER,
            Some(&cancel),
            || async { Err::<(), _>("broker down") },
            |_, _| {},
        )
        .await;
        assert_eq!(v, None);
    }
}
