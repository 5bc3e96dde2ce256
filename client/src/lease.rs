//! The client's lease, as a state machine: when to ask the leader for a renewal, until when
//! an answered renewal lets the cache serve, and when the leader has stopped answering. Pure
//! (every method takes `now`); [`crate::watch`] sends and receives the messages.

use mortar_proto::wire::WATCH_LEASE;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use mortar_proto::timing::RENEW_EVERY;
/// Without an answered renewal for this long, the watch is given up (and its cache dropped).
pub const GIVE_UP_AFTER: Duration = Duration::from_millis(2 * WATCH_LEASE.as_millis() as u64);

const _: () = assert!(GIVE_UP_AFTER.as_millis() > WATCH_LEASE.as_millis());

#[derive(Debug)]
pub struct Renewals {
    /// Renewals asked and not answered: number → when asked.
    asked: BTreeMap<u64, Instant>,
    last: u64,
    last_renewed: Instant,
}

impl Renewals {
    pub fn new(now: Instant) -> Renewals {
        Renewals {
            asked: BTreeMap::new(),
            last: 0,
            last_renewed: now,
        }
    }

    /// A renewal is due: the number to ask with, or Err once the leader has answered none
    /// for [`GIVE_UP_AFTER`].
    pub fn ask(&mut self, now: Instant) -> Result<u64, String> {
        if now.duration_since(self.last_renewed) > GIVE_UP_AFTER {
            return Err(format!(
                "no lease renewal answered for {:?}",
                now.duration_since(self.last_renewed)
            ));
        }
        self.last += 1;
        self.asked.insert(self.last, now);
        Ok(self.last)
    }

    /// The leader renewed `n`: the cache may serve until [`WATCH_LEASE`] after it was asked
    /// (the client counts from its own asking, never from the answer). Earlier unanswered
    /// renewals are forgotten; an answer to one of those, or to an unknown number, gives
    /// nothing.
    pub fn renewed(&mut self, n: u64, now: Instant) -> Option<Instant> {
        let at = self.asked.remove(&n)?;
        self.asked = self.asked.split_off(&n);
        self.last_renewed = now;
        Some(at + WATCH_LEASE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_lease_runs_from_the_asking_not_from_the_answer() {
        let t0 = Instant::now();
        let mut r = Renewals::new(t0);
        let n = r.ask(t0).unwrap();
        assert_eq!(r.renewed(n, t0 + ms(300)), Some(t0 + WATCH_LEASE));
    }

    #[test]
    fn a_late_answer_to_an_older_renewal_gives_nothing() {
        let t0 = Instant::now();
        let mut r = Renewals::new(t0);
        let first = r.ask(t0).unwrap();
        let second = r.ask(t0 + RENEW_EVERY).unwrap();
        assert_eq!(
            r.renewed(second, t0 + ms(300)),
            Some(t0 + RENEW_EVERY + WATCH_LEASE)
        );
        assert_eq!(
            r.renewed(first, t0 + ms(310)),
            None,
            "forgotten once a newer one came"
        );
        assert_eq!(r.renewed(99, t0 + ms(310)), None);
    }

    #[test]
    fn a_leader_that_stops_answering_is_given_up_after_two_leases() {
        let t0 = Instant::now();
        let mut r = Renewals::new(t0);
        let mut t = t0;
        while t <= t0 + GIVE_UP_AFTER {
            assert!(r.ask(t).is_ok());
            t += RENEW_EVERY;
        }
        assert!(r.ask(t0 + GIVE_UP_AFTER + ms(1)).is_err());
        // One answer in time keeps it.
        let mut r = Renewals::new(t0);
        let asked = t0 + GIVE_UP_AFTER - ms(100);
        let n = r.ask(asked).unwrap();
        r.renewed(n, asked + ms(50)).unwrap();
        assert!(r.ask(asked + GIVE_UP_AFTER).is_ok());
    }
}
