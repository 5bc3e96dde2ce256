//! `mortar volume rebalance VOL start|status|stop`: after `add-brick`, move every chunk whose
//! placement changed to its new replica set, brick to brick, then settle the layout and drop
//! the copies left behind. Under the volume's heal lease; the progress is recorded in the
//! namespace after every page, so `status` shows it from any host and `start` after a crash
//! or a `stop` goes on from the cursor.
//!
//! Why no step loses a chunk: a chunk is counted moved only once a quorum of its new set
//! holds a copy that the receiving bricks verified; the layout is settled only after every
//! old set was scanned after every brick had applied the new layout (so no brick could still
//! store a moving chunk on its old set behind the scan); a copy left behind is dropped only
//! by a brick that has applied the settled layout, and only after a quorum of the chunk's set
//! is seen holding it. Readers look in the new set first and the old one second until the
//! layout settles, and a reader that finds nothing reads the layout again.

use crate::heal::{under_lease, Progress};
use anyhow::{anyhow, bail, Context, Result};
use mortar_client::volume_admin as admin;
use mortar_client::Volume;
use mortar_proto::replication::write_quorum;
use mortar_proto::wire::{MetaOp, RebalanceState};
use mortar_proto::{layout, ChunkId, Timestamp, VolumeConfig};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunk ids listed per page by default (the cursor is recorded after each).
pub const PAGE: u32 = 2048;
/// Chunks per brick-to-brick copy request.
const BATCH: usize = 64;
/// How long to wait for every brick to apply a new layout.
const APPLY_WAIT: Duration = Duration::from_secs(60);

pub struct Options {
    /// Bytes per second moved at most (0: unthrottled).
    pub rate: u64,
    /// Chunk ids per page: the progress is recorded after each.
    pub page: u32,
}

pub enum Outcome {
    Completed(RebalanceState),
    Stopped(RebalanceState),
    NothingToDo,
}

pub async fn start(vol: Arc<Volume>, opts: &Options, progress: &Progress) -> Result<Outcome> {
    under_lease(&vol, run(&vol, opts, progress)).await
}

async fn run(vol: &Volume, opts: &Options, progress: &Progress) -> Result<Outcome> {
    let config = vol.refresh_config().await?;
    let recorded = vol.rebalance_state().await?;
    let mut state = match (&config.previous, recorded) {
        (Some(_), Some(s)) if s.epoch == config.epoch => s,
        (Some(_), _) => fresh_state(vol, &config).await?,
        // Settled by an earlier run that stopped before the copies left behind were dropped.
        (None, Some(s)) if s.status == "moved" && s.epoch + 1 == config.epoch => s,
        (None, _) => return Ok(Outcome::NothingToDo),
    };
    state.run = rand::random();
    if config.previous.is_some() {
        state.status = "running".into();
        record(vol, &mut state).await?;
        every_brick_at(vol, &config, config.epoch).await?;
        if !move_chunks(vol, &config, &mut state, opts, progress).await? {
            return Ok(Outcome::Stopped(state));
        }
        vol.admin_op(MetaOp::SettleLayout {
            epoch: config.epoch,
        })
        .await
        .context("cannot settle the layout")?;
        state.status = "moved".into();
        record(vol, &mut state).await?;
    }
    let settled = vol.refresh_config().await?;
    every_brick_at(vol, &settled, settled.epoch).await?;
    let dropped = drop_left_behind(vol, &settled).await?;
    progress.line(&format!(
        "dropped {dropped} copies left behind on the previous sets"
    ));
    state.status = "completed".into();
    record(vol, &mut state).await?;
    Ok(Outcome::Completed(state))
}

async fn fresh_state(vol: &Volume, config: &VolumeConfig) -> Result<RebalanceState> {
    let mut total = 0;
    for i in old_sets(config) {
        let b = &config.replica_sets[i].bricks[0];
        total += admin::status(vol.pool(), &b.addr)
            .await
            .map(|s| s.chunk_count)
            .unwrap_or(0);
    }
    Ok(RebalanceState {
        epoch: config.epoch,
        set: old_sets(config).first().copied().unwrap_or(0),
        cursor: None,
        total,
        started: Timestamp::now(),
        status: "running".into(),
        ..Default::default()
    })
}

fn old_sets(config: &VolumeConfig) -> Vec<usize> {
    let Some(ids) = &config.previous else {
        return Vec::new();
    };
    (0..config.replica_sets.len())
        .filter(|i| ids.contains(&config.replica_sets[*i].id))
        .collect()
}

fn stamped(state: &mut RebalanceState) -> RebalanceState {
    state.updated = Timestamp::now();
    state.clone()
}

async fn record(vol: &Volume, state: &mut RebalanceState) -> Result<()> {
    vol.admin_op(MetaOp::Rebalance(stamped(state)))
        .await
        .context("cannot record the rebalance's progress")?;
    Ok(())
}

/// Wait until every brick of the volume has applied layout `epoch`.
async fn every_brick_at(vol: &Volume, config: &VolumeConfig, epoch: u64) -> Result<()> {
    let deadline = Instant::now() + APPLY_WAIT;
    for b in config.bricks() {
        loop {
            match admin::status(vol.pool(), &b.addr).await {
                Ok(s) if s.layout_epoch >= epoch => break,
                Ok(s) if Instant::now() >= deadline => bail!(
                    "brick {} has not applied layout epoch {epoch} (it is at {})",
                    b.addr,
                    s.layout_epoch
                ),
                Err(e) if Instant::now() >= deadline => {
                    bail!("brick {} does not answer: {e}", b.addr)
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}

/// One page of the chunks a replica set holds after `after`, from every brick of it that
/// answers: the ids up to the lowest last id of a full page are complete from all of them.
/// Returns the ids and the cursor after them (None at the end).
async fn set_page(
    vol: &Volume,
    config: &VolumeConfig,
    set: usize,
    after: Option<ChunkId>,
    limit: u32,
) -> Result<(Vec<ChunkId>, Option<ChunkId>)> {
    let mut ids = BTreeSet::new();
    let mut bound: Option<ChunkId> = None;
    let mut answered = 0;
    for b in &config.replica_sets[set].bricks {
        let Ok(page) = admin::list_chunks_page(vol.pool(), &b.addr, after, limit).await else {
            continue;
        };
        answered += 1;
        if page.len() == limit as usize {
            let last = *page.last().expect("a full page");
            bound = Some(bound.map_or(last, |b| b.min(last)));
        }
        ids.extend(page);
    }
    if answered < write_quorum(config.replica_sets[set].bricks.len()) {
        bail!("too few bricks of a replica set answer to list its chunks");
    }
    let ids: Vec<ChunkId> = ids
        .into_iter()
        .filter(|id| bound.is_none_or(|b| *id <= b))
        .collect();
    Ok((ids, bound))
}

/// Scan every old set from the recorded cursor and copy each chunk whose placement moved to
/// its new set. False when a `stop` was recorded meanwhile.
async fn move_chunks(
    vol: &Volume,
    config: &VolumeConfig,
    state: &mut RebalanceState,
    opts: &Options,
    progress: &Progress,
) -> Result<bool> {
    let bar = progress.bar(state.total.max(state.scanned), "rebalance: chunks scanned");
    bar.set_position(state.scanned);
    let began = Instant::now();
    let moved_before = state.moved_bytes;
    let from = state.set;
    for set in old_sets(config).into_iter().filter(|s| *s >= from) {
        if set != state.set {
            state.set = set;
            state.cursor = None;
        }
        let sources: Vec<String> = config.replica_sets[set]
            .bricks
            .iter()
            .map(|b| b.addr.clone())
            .collect();
        loop {
            if vol
                .rebalance_state()
                .await?
                .is_some_and(|s| s.status == "stopped")
            {
                bar.abandon();
                state.status = "stopped".into();
                return Ok(false);
            }
            let (ids, next) = set_page(vol, config, set, state.cursor, opts.page).await?;
            let moving: Vec<ChunkId> = ids
                .iter()
                .copied()
                .filter(|id| layout::replica_set_index(config, id) != set)
                .collect();
            for batch in moving.chunks(BATCH) {
                let bytes = copy_to_new_sets(vol, config, batch, &sources).await?;
                state.moved += batch.len() as u64;
                state.moved_bytes += bytes;
                throttle(opts.rate, state.moved_bytes - moved_before, began).await;
            }
            state.scanned += ids.len() as u64;
            bar.set_position(state.scanned);
            state.cursor = next;
            match vol.admin_op(MetaOp::Rebalance(stamped(state))).await {
                Ok(_) => {}
                // A stop was recorded during this page: the page's work is kept (the copies
                // are made); the next start repeats it from the recorded cursor.
                Err(mortar_proto::FsError::Busy(_)) => {
                    bar.abandon();
                    state.status = "stopped".into();
                    return Ok(false);
                }
                Err(e) => return Err(e).context("cannot record the rebalance's progress"),
            }
            if next.is_none() {
                break;
            }
        }
    }
    bar.finish_and_clear();
    Ok(true)
}

/// Copy each chunk of `batch` to every brick of its new set (the brick fetches from `sources`
/// and verifies); fails unless a quorum of each chunk's set then holds it. The chunks' bytes
/// (once per chunk, however many copies were made).
async fn copy_to_new_sets(
    vol: &Volume,
    config: &VolumeConfig,
    batch: &[ChunkId],
    sources: &[String],
) -> Result<u64> {
    let mut bytes = 0;
    for (set, ids) in layout::by_set(config, batch) {
        let bricks = &config.replica_sets[set].bricks;
        let mut held = vec![0usize; ids.len()];
        let mut size = vec![0u64; ids.len()];
        for b in bricks {
            match admin::fetch_chunks(vol.pool(), &b.addr, &ids, sources).await {
                Ok(results) => {
                    for (i, r) in results.into_iter().enumerate() {
                        if let Ok(n) = r {
                            held[i] += 1;
                            size[i] = size[i].max(n);
                        }
                    }
                }
                Err(e) => tracing::warn!(brick = %b.addr, error = %e, "a copy request failed"),
            }
        }
        bytes += size.iter().sum::<u64>();
        if let Some(i) = held.iter().position(|h| *h < write_quorum(bricks.len())) {
            bail!(
                "chunk {} reached only {} bricks of its new set; run rebalance start again",
                ids[i],
                held[i]
            );
        }
    }
    Ok(bytes)
}

async fn throttle(rate: u64, bytes: u64, since: Instant) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(since.elapsed()) {
        tokio::time::sleep(wait).await;
    }
}

/// After the layout settled: on every brick, the chunks its set no longer holds and a quorum
/// of their own set does are removed. Copies dropped.
async fn drop_left_behind(vol: &Volume, config: &VolumeConfig) -> Result<u64> {
    let mut dropped = 0u64;
    for (set, s) in config.replica_sets.iter().enumerate() {
        for b in &s.bricks {
            let mut after = None;
            loop {
                let page = admin::list_chunks_page(vol.pool(), &b.addr, after, PAGE).await?;
                let Some(last) = page.last().copied() else {
                    break;
                };
                let strays: Vec<ChunkId> = page
                    .iter()
                    .copied()
                    .filter(|id| layout::replica_set_index(config, id) != set)
                    .collect();
                let confirmed = on_their_sets(vol, config, &strays).await?;
                if !confirmed.is_empty() {
                    dropped += admin::drop_strays(vol.pool(), &b.addr, &confirmed, config.epoch)
                        .await?
                        .len() as u64;
                }
                if page.len() < PAGE as usize {
                    break;
                }
                after = Some(last);
            }
        }
    }
    Ok(dropped)
}

/// Those of `ids` a quorum of their own set holds.
async fn on_their_sets(
    vol: &Volume,
    config: &VolumeConfig,
    ids: &[ChunkId],
) -> Result<Vec<ChunkId>> {
    let mut out = Vec::new();
    for (set, ids) in layout::by_set(config, ids) {
        let bricks = &config.replica_sets[set].bricks;
        let mut held = vec![0usize; ids.len()];
        for b in bricks {
            if let Ok(present) = admin::has_chunks(vol.pool(), &b.addr, &ids).await {
                for (i, here) in present.into_iter().enumerate() {
                    held[i] += usize::from(here);
                }
            }
        }
        out.extend(
            ids.iter()
                .zip(held)
                .filter(|(_, h)| *h >= write_quorum(bricks.len()))
                .map(|(id, _)| *id),
        );
    }
    Ok(out)
}

/// Mark the running rebalance stopped: it stops after its current page.
pub async fn stop(vol: &Volume) -> Result<RebalanceState> {
    let mut state = vol
        .rebalance_state()
        .await?
        .ok_or_else(|| anyhow!("no rebalance has run on this volume"))?;
    if state.status != "running" {
        bail!("the rebalance is not running (it is {})", state.status);
    }
    state.status = "stopped".into();
    record(vol, &mut state).await?;
    Ok(state)
}

/// Lines for `rebalance status`.
pub fn describe(state: &RebalanceState) -> Vec<String> {
    let secs = (state.updated.secs - state.started.secs).max(1) as f64;
    let rate = state.moved_bytes as f64 / secs;
    let mut lines = vec![
        format!("status: {} (layout epoch {})", state.status, state.epoch),
        format!("scanned: {} of about {} chunks", state.scanned, state.total),
        format!(
            "moved: {} chunks, {} at {}/s",
            state.moved,
            crate::human(state.moved_bytes),
            crate::human(rate as u64)
        ),
    ];
    if state.status == "running" && state.scanned > 0 {
        let left = state.total.saturating_sub(state.scanned) as f64;
        let eta = left / (state.scanned as f64 / secs);
        lines.push(format!("estimated time left: {:.0} s", eta));
    }
    lines
}
