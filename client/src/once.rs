//! Sequence numbers for this client's namespace changes. Bricks remember the outcome of each
//! client's last [`ONCE_WINDOW`] changes by number, so a retry after a lost answer gets the
//! first outcome instead of, say, EEXIST. That holds only if no number is still open (sent and
//! unanswered, or kept to be sent again) when the number `ONCE_WINDOW` past it is handed out:
//! a ticket is handed out only within the window above the oldest open one, and waits
//! otherwise. Concurrency alone never bounded that (a stalled commit with hundreds of changes
//! in flight behind it, or a batch kept for resending while others went on).

use mortar_proto::wire::{OpId, ONCE_WINDOW};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Numbers handed out and not yet closed. Pure: [`Open::take`] decides.
#[derive(Debug)]
struct Open {
    next: u64,
    open: BTreeSet<u64>,
    window: u64,
}

impl Open {
    /// The next number, unless it would be a window or more past the oldest open one.
    fn take(&mut self) -> Option<u64> {
        let oldest = self.open.first().copied().unwrap_or(self.next);
        if self.next - oldest >= self.window {
            return None;
        }
        let n = self.next;
        self.next += 1;
        self.open.insert(n);
        Some(n)
    }

    fn close(&mut self, n: u64) {
        self.open.remove(&n);
    }
}

pub(crate) struct Seqs {
    client: u128,
    open: Mutex<Open>,
    closed: Notify,
}

/// One change's id, open until dropped (answered, or given up for good).
pub(crate) struct Ticket {
    id: OpId,
    seqs: Arc<Seqs>,
}

impl Ticket {
    pub(crate) fn id(&self) -> OpId {
        self.id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.seqs.open.lock().expect("seqs lock").close(self.id.seq);
        self.seqs.closed.notify_waiters();
    }
}

impl Seqs {
    pub(crate) fn new(client: u128) -> Arc<Seqs> {
        Self::with_window(client, ONCE_WINDOW)
    }

    fn with_window(client: u128, window: u64) -> Arc<Seqs> {
        Arc::new(Seqs {
            client,
            open: Mutex::new(Open {
                next: 1,
                open: BTreeSet::new(),
                window,
            }),
            closed: Notify::new(),
        })
    }

    /// The next change's ticket; waits while the window above the oldest open one is full.
    pub(crate) async fn ticket(self: &Arc<Self>) -> Ticket {
        let mut said = false;
        loop {
            let closed = self.closed.notified();
            let oldest = {
                let mut open = self.open.lock().expect("seqs lock");
                if let Some(seq) = open.take() {
                    return Ticket {
                        id: OpId {
                            client: self.client,
                            seq,
                        },
                        seqs: self.clone(),
                    };
                }
                open.open.first().copied()
            };
            if !said {
                // Rare, and a wait with no deadline of its own: say so, for diagnosis.
                tracing::warn!(?oldest, "a change waits for the oldest unanswered change");
                said = true;
            }
            closed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn no_number_is_handed_out_a_window_past_an_open_one() {
        let mut o = Open {
            next: 1,
            open: BTreeSet::new(),
            window: 4,
        };
        let first = o.take().unwrap();
        for _ in 0..3 {
            let n = o.take().unwrap();
            o.close(n);
        }
        assert_eq!(
            o.take(),
            None,
            "number 5 would make number 1's outcome forgotten"
        );
        o.close(first);
        assert_eq!(o.take(), Some(5));
    }

    #[tokio::test]
    async fn a_ticket_waits_for_the_oldest_to_close() {
        let seqs = Seqs::with_window(7, 2);
        let oldest = seqs.ticket().await;
        drop(seqs.ticket().await);
        let waiting = tokio::spawn({
            let seqs = seqs.clone();
            async move { seqs.ticket().await.id() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the window above number 1 is full");
        drop(oldest);
        let id = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("handed out once the oldest closed")
            .unwrap();
        assert_eq!(id, OpId { client: 7, seq: 3 });
    }
}
