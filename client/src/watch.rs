//! The client's watch on the metadata leader: keeps the lease that lets [`crate::meta_cache`]
//! answer from memory, and applies and acknowledges the leader's invalidations.

use crate::lease::{Renewals, RENEW_EVERY};
use crate::Volume;
use mortar_proto::wire::{
    read_frame, write_frame, Inval, Query, Request, WatchDown, WatchUp, WATCH_LEASE,
};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Pause before watching again after a watch ended, doubling while no watch can be opened.
const RETRY_AFTER: Duration = Duration::from_millis(100);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long an invalidation's acknowledgement waits for the invalidation hook's task (the
/// kernel's caches): a process on this mount must not read the old state after the writer
/// elsewhere was answered. Bounded, because the kernel may hold a notification while it waits
/// for one of our answers, which may wait for this acknowledgement.
pub const KERNEL_INVAL_WAIT: Duration = Duration::from_millis(100);
const _: () = assert!(KERNEL_INVAL_WAIT.as_millis() * 5 <= WATCH_LEASE.as_millis());

/// Keep a watch on the current leader for as long as the volume is in use.
pub(crate) async fn run(volume: Weak<Volume>) {
    let mut pause = RETRY_AFTER;
    loop {
        let Some(v) = volume.upgrade() else { return };
        let outcome = watch_leader(&v).await;
        v.meta_cache.watch_ended();
        // Delegations end with the lease; what they held is committed by the committer.
        v.lease_lost();
        match outcome {
            Ok(()) => pause = RETRY_AFTER,
            Err(e) => {
                tracing::debug!(error = %e, "no watch; answering from the leader until there is one");
                pause = (pause * 2).min(MAX_RETRY_AFTER);
            }
        }
        // A brick already named the next leader (the watch moved): watch it at once.
        let known = v.leader.lock().expect("leader lock").is_some();
        drop(v);
        if !known {
            tokio::time::sleep(pause).await;
        }
    }
}

async fn leader_addr(v: &Volume) -> Option<String> {
    if let Some(l) = v.leader.lock().expect("leader lock").clone() {
        return Some(l);
    }
    // Any namespace answer names the leader.
    let _ = v.query(Query::GetAttr { ino: 1 }).await;
    v.leader.lock().expect("leader lock").clone()
}

/// Ok when a watch was opened (however it ended later), Err when none could be.
async fn watch_leader(v: &Arc<Volume>) -> Result<(), String> {
    let addr = leader_addr(v).await.ok_or("no metadata leader known")?;
    let watched = watch_at(v, &addr).await;
    // That leader may be gone: find it afresh for the next watch (a delegation's holder must
    // reach the new leader soon, to give back what it held there), unless a brick has
    // already named another.
    let mut known = v.leader.lock().expect("leader lock");
    if known.as_deref() == Some(addr.as_str()) {
        *known = None;
    }
    watched
}

async fn watch_at(v: &Arc<Volume>, addr: &str) -> Result<(), String> {
    let conn = v.pool.connection(addr).await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Request::Watch {
        client: v.client_id,
    };
    write_frame(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let first = tokio::time::timeout(WATCH_LEASE, read_frame::<WatchDown>(&mut recv))
        .await
        .map_err(|_| format!("{addr} did not answer the watch"))?
        .map_err(|e| e.to_string())?;
    match first {
        WatchDown::Welcome { leader, term } => v.meta_cache.watch_started(leader, term),
        WatchDown::Refused(e) => {
            *v.leader.lock().expect("leader lock") = None;
            return Err(format!("{addr} refused the watch: {e}"));
        }
        other => return Err(format!("unexpected first watch message {other:?}")),
    }
    tracing::debug!(%addr, "watching the metadata leader");
    if let Err(e) = keep_watch(v, addr, send, recv).await {
        tracing::debug!(%addr, error = %e, "watch ended");
    }
    Ok(())
}

async fn keep_watch(
    v: &Arc<Volume>,
    addr: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    // Reading frames is not cancel-safe, so it runs on its own and feeds a channel.
    let (down_tx, mut down) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let msg = read_frame::<WatchDown>(&mut recv).await;
            let end = msg.is_err();
            if down_tx.send(msg).is_err() || end {
                break;
            }
        }
    });
    let _stop_reader = scopeguard(reader);
    // A recall is acknowledged by whichever commit settles what it covers (that takes round
    // trips, during which this loop must keep acknowledging invalidations).
    // Acknowledgements given later: of recalls, and of invalidations the kernel had to drop.
    let (acks, mut recalled) = mpsc::unbounded_channel::<u64>();
    let watch = v.deleg.watch_opened(acks.clone());
    let mut tick = tokio::time::interval(RENEW_EVERY);
    let mut renewals = Renewals::new(Instant::now());
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let n = renewals
                    .ask(Instant::now())
                    .map_err(|e| format!("{addr}: {e}"))?;
                write_frame(&mut send, &WatchUp::Renew { n })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            _ = v.leader_moved.notified() => {
                let named = v.leader.lock().expect("leader lock").clone();
                if let Some(other) = named.filter(|l| l != addr) {
                    return Err(format!("the leader moved from {addr} to {other}"));
                }
            }
            Some(seq) = recalled.recv() => {
                write_frame(&mut send, &WatchUp::Ack { seq })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            _ = v.bye.notified() => {
                let said = write_frame(&mut send, &WatchUp::Bye).await;
                let _ = send.finish();
                // Wait for the leader to close the stream: then it has read the goodbye.
                let _ = tokio::time::timeout(WATCH_LEASE, down.recv()).await;
                v.said_bye.notify_one();
                return said.map_err(|e| e.to_string());
            }
            msg = down.recv() => {
                let msg = msg.ok_or("watch reader stopped")?.map_err(|e| e.to_string())?;
                match msg {
                    WatchDown::Renewed { n } => {
                        if let Some(until) = renewals.renewed(n, Instant::now()) {
                            v.meta_cache.renewed(until);
                        }
                    }
                    WatchDown::Invalidate { seq, index, items } => {
                        if items.contains(&Inval::Volume) {
                            let v = Arc::clone(v);
                            tokio::spawn(async move {
                                if let Err(e) = v.refresh_config().await {
                                    tracing::warn!(error = %e, "cannot read the changed volume configuration");
                                }
                            });
                        }
                        v.meta_cache.invalidate(index, &items);
                        match v.inval_hook.get().and_then(|hook| hook(&items)) {
                            Some(task) => {
                                let acks = acks.clone();
                                tokio::spawn(async move {
                                    let _ = tokio::time::timeout(KERNEL_INVAL_WAIT, task).await;
                                    let _ = acks.send(seq);
                                });
                            }
                            None => write_frame(&mut send, &WatchUp::Ack { seq })
                                .await
                                .map_err(|e| e.to_string())?,
                        }
                    }
                    WatchDown::Recall { seq, dir } => v.recalled(dir, watch, seq),
                    other => return Err(format!("unexpected watch message {other:?}")),
                }
            }
        }
    }
}

/// Abort the reader task when the watch ends, however it ends.
fn scopeguard(task: tokio::task::JoinHandle<()>) -> impl Drop {
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    Abort(task)
}
