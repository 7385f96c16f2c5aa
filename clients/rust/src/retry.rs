//! Retrying retryable answers: which events to send again, and when.

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use crate::{Ack, Error};

/// When and how a client retries: refusals that are [`Error::is_retryable`] (`unavailable`,
/// `too_many_connections`, `rate_limited`) and connections that broke before the answer, with exponential backoff
/// (from `initial`, doubling up to `max`, with jitter; a `rate_limited` answer's own delay when that is longer),
/// for at most `deadline` in all. Then the last result stands.
///
/// Every attempt carries the event's `idempotency_key` (a random UUID is set when the event has none), so the
/// daemon stores the event once however many answers were lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// How long to go on retrying, from the first attempt.
    pub deadline: Duration,
    /// The first delay.
    pub initial: Duration,
    /// The longest delay between two attempts.
    pub max: Duration,
}

impl Default for Retry {
    /// 30 s in all, from 50 ms up to 2 s between attempts.
    fn default() -> Retry {
        Retry {
            deadline: Duration::from_secs(30),
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
    }
}

impl Retry {
    /// Retries for `deadline` in all, with the default delays.
    pub fn for_at_most(deadline: Duration) -> Retry {
        Retry {
            deadline,
            ..Retry::default()
        }
    }

    pub(crate) fn start(&self, events: usize) -> Plan {
        Plan {
            deadline: Instant::now() + self.deadline,
            delay: self.initial,
            max: self.max,
            pending: (0..events).collect(),
            results: (0..events).map(|_| None).collect(),
            jitter: RandomState::new(),
            attempts: 0,
        }
    }
}

/// The state of one retried batch, shared by the blocking and the async client.
pub(crate) struct Plan {
    deadline: Instant,
    delay: Duration,
    max: Duration,
    pending: Vec<usize>,
    results: Vec<Option<Result<Ack, Error>>>,
    jitter: RandomState,
    attempts: u64,
}

impl Plan {
    /// The events (indexes into the batch) to send in the next attempt.
    pub(crate) fn pending(&self) -> &[usize] {
        &self.pending
    }

    /// Takes the results of an attempt (one per pending event, in order); returns how long to wait before the
    /// next attempt, or `None` when there is none to make.
    pub(crate) fn record(&mut self, results: Vec<Result<Ack, Error>>) -> Option<Duration> {
        self.attempts += 1;
        let mut still = Vec::new();
        let mut wait = Duration::ZERO;
        for (&i, result) in self.pending.iter().zip(results) {
            if let Err(e) = &result {
                if e.is_retryable() {
                    still.push(i);
                    wait = wait.max(e.retry_after().unwrap_or_default());
                }
            }
            self.results[i] = Some(result);
        }
        self.pending = still;
        if self.pending.is_empty() {
            return None;
        }
        // Between half and all of the current delay, so that clients refused together do not return together.
        let fraction = (self.jitter.hash_one(self.attempts) % 1000) as f64 / 2000.0 + 0.5;
        let delay = self.delay.mul_f64(fraction).max(wait);
        self.delay = (self.delay * 2).min(self.max);
        (Instant::now() + delay <= self.deadline).then_some(delay)
    }

    /// One result per event, in order.
    pub(crate) fn finish(self) -> Vec<Result<Ack, Error>> {
        self.results
            .into_iter()
            .map(|r| r.expect("every event was attempted"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Refusal;

    fn unavailable() -> Result<Ack, Error> {
        Err(Error::Unavailable(Refusal {
            message: "disk full".into(),
            details: vec![],
        }))
    }

    fn ack(seq: u64) -> Result<Ack, Error> {
        Ok(Ack {
            id: format!("id-{seq}"),
            seq,
            duplicate: false,
        })
    }

    #[test]
    fn only_retryable_results_are_sent_again_until_none_is_left() {
        let mut plan = Retry::default().start(3);
        assert_eq!(plan.pending(), &[0, 1, 2]);
        let invalid = Err(Error::InvalidEvent(Refusal {
            message: "no".into(),
            details: vec![],
        }));
        let delay = plan.record(vec![ack(1), unavailable(), invalid]).unwrap();
        assert!(delay <= Retry::default().initial);
        assert_eq!(plan.pending(), &[1]);
        assert!(plan.record(vec![ack(2)]).is_none());
        let results = plan.finish();
        assert_eq!(results[0].as_ref().unwrap().seq, 1);
        assert_eq!(results[1].as_ref().unwrap().seq, 2);
        assert!(matches!(results[2], Err(Error::InvalidEvent(_))));
    }

    #[test]
    fn the_deadline_ends_retries_and_the_last_result_stands() {
        let mut plan = Retry::for_at_most(Duration::ZERO).start(1);
        assert!(plan.record(vec![unavailable()]).is_none());
        assert!(matches!(plan.finish()[0], Err(Error::Unavailable(_))));
    }

    #[test]
    fn a_rate_limited_answer_sets_the_least_delay_and_delays_grow_to_the_max() {
        let retry = Retry {
            deadline: Duration::from_secs(3600),
            initial: Duration::from_millis(10),
            max: Duration::from_millis(40),
        };
        let mut plan = retry.start(1);
        let limited = Err(Error::RateLimited {
            refusal: Refusal {
                message: "slow".into(),
                details: vec![],
            },
            retry_after: Some(Duration::from_millis(700)),
        });
        assert_eq!(plan.record(vec![limited]), Some(Duration::from_millis(700)));
        for _ in 0..10 {
            let d = plan.record(vec![unavailable()]).unwrap();
            assert!(d <= Duration::from_millis(40), "{d:?}");
        }
        assert!(plan.record(vec![unavailable()]).unwrap() >= Duration::from_millis(20));
    }
}
