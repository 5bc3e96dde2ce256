//! Changes proposed to Raft and not answered yet, by their [`OpId`]. A client that gave up
//! waiting retries under the same id; the retry joins the proposal already in the log instead
//! of proposing the change again. Proposing again is harmless for the outcome (the once table
//! applies a change once) but not for the log: under load every slow change then becomes
//! several entries, commits slow further, and more requests give up — a retry storm that
//! stalled all commits for 30 s on a busy two-core machine.

use futures::future::{BoxFuture, FutureExt, Shared};
use mortar_proto::wire::OpId;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// A proposal's outcome, shared by everyone waiting for it.
pub type Pending<R> = Shared<BoxFuture<'static, Arc<R>>>;

pub struct Proposals<R> {
    pending: Arc<Mutex<HashMap<OpId, Pending<R>>>>,
}

impl<R> Default for Proposals<R> {
    fn default() -> Self {
        Proposals {
            pending: Arc::default(),
        }
    }
}

impl<R: Send + Sync + 'static> Proposals<R> {
    /// The outcome of the proposal of `id`: the one in flight, or `propose` started now. A
    /// started proposal is driven to its end and forgotten then, whoever still waits.
    pub fn join_or_start<F>(&self, id: OpId, propose: F) -> Pending<R>
    where
        F: Future<Output = R> + Send + 'static,
    {
        let mut pending = self.pending.lock().expect("proposals lock");
        if let Some(p) = pending.get(&id) {
            return p.clone();
        }
        let p = propose.map(Arc::new).boxed().shared();
        pending.insert(id, p.clone());
        let (all, mine) = (self.pending.clone(), p.clone());
        tokio::spawn(async move {
            let _ = mine.await;
            all.lock().expect("proposals lock").remove(&id);
        });
        p
    }

    pub fn in_flight(&self) -> usize {
        self.pending.lock().expect("proposals lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_retry_joins_the_proposal_in_flight_and_it_is_forgotten_once_answered() {
        let p: Proposals<u32> = Proposals::default();
        let started = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let id = OpId { client: 1, seq: 7 };
        let s = started.clone();
        let first = p.join_or_start(id, async move {
            s.fetch_add(1, Ordering::SeqCst);
            rx.await.unwrap()
        });
        // The first waiter gives up; its retry joins instead of proposing again.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), first)
                .await
                .is_err()
        );
        let s = started.clone();
        let retry = p.join_or_start(id, async move {
            s.fetch_add(1, Ordering::SeqCst);
            0
        });
        tx.send(5).unwrap();
        assert_eq!(*retry.await, 5);
        assert_eq!(started.load(Ordering::SeqCst), 1, "proposed once");
        for _ in 0..100 {
            if p.in_flight() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(p.in_flight(), 0, "forgotten once answered");
    }
}
