//! `mortar volume heal`: bring the replicas of a volume back in step, by hash, and say truthfully
//! what is left. The operator's side decides what to move; bricks copy between themselves and
//! verify every chunk they receive, and only serve copies that verify.
//!
//! One run, under the volume's heal lease (a Raft-replicated lease, so two runs never overlap
//! even when started on different hosts):
//! 1. every brick up? (a down brick is reported and healed on a later run)
//! 2. metadata replicas compared at one applied index (a mismatch is the alarm)
//! 3. with `--full`, every brick reads and verifies every chunk (throttled); bad copies go
//! 4. garbage: chunks no inode names, stored and released longer than the grace period ago
//! 5. replica sets: differing digest buckets, heal index entries and referenced chunks tell
//!    which brick lacks what; it copies each from a peer whose copy verifies
//! 6. heal index entries that are now satisfied are dropped; what remains is reported

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use mortar_client::volume_admin as admin;
use mortar_client::Volume;
use mortar_proto::digest::{differing_buckets, Bucket};
use mortar_proto::wire::{HealEntry, HealReason, MetaOp};
use mortar_proto::{layout, BrickId, BrickRef, ChunkId, FsError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The heal lease lasts this long unless renewed; a crashed run blocks the next for at most this.
const LEASE_TTL_SECS: u32 = 60;
const LEASE_RENEW: Duration = Duration::from_secs(15);
/// Chunks per brick-to-brick copy request.
const FETCH_BATCH: usize = 64;
/// Bucket listings asked of one brick at once.
const LIST_IN_FLIGHT: usize = 16;
/// Chunks per scrub request.
const SCRUB_PAGE: u32 = 256;
/// How long to wait for every replica to reach the same applied index before comparing.
const META_SETTLE: Duration = Duration::from_secs(15);

pub struct Options {
    pub full: bool,
    /// Scrub read rate per brick, bytes per second (0: unthrottled).
    /// None: the volume option heal.scrub-rate.
    pub scrub_rate: Option<u64>,
    /// None: the volume option `heal.gc-grace`.
    pub gc_grace_secs: Option<u64>,
    /// A follower behind the metadata leader this long is a problem.
    pub max_lag_secs: u64,
}

/// Terminal: a progress bar per step. Cron and pipes: plain lines.
pub struct Progress {
    tty: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub(crate) fn line(&self, msg: &str) {
        println!("{msg}");
    }

    pub(crate) fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.tty {
            self.line(what);
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len).with_message(what.to_string());
        bar.set_style(
            ProgressStyle::with_template("{msg:28} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    }
}

#[derive(Default)]
struct Tally {
    copied: u64,
    copied_bytes: u64,
    corrupt: u64,
    collected: u64,
    left: Vec<String>,
}

/// What the CLI reports: healed, or what is left and why.
pub enum Outcome {
    Healed,
    Left(Vec<String>),
}

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// Run `work` under the volume's heal lease (heal and rebalance both take it, so neither
/// overlaps another run of either, wherever they are started).
pub(crate) async fn under_lease<T>(
    vol: &Arc<Volume>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let holder = holder();
    let lease = |ttl_secs| MetaOp::HealLease {
        holder: holder.clone(),
        ttl_secs,
    };
    vol.admin_op(lease(LEASE_TTL_SECS))
        .await
        .map_err(|e| match e {
            FsError::Busy(m) => anyhow!("another heal or rebalance of this volume is running: {m}"),
            e => anyhow!("cannot take the volume's heal lease: {e}"),
        })?;
    let renewer = {
        let vol = vol.clone();
        let op = lease(LEASE_TTL_SECS);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                if let Err(e) = vol.admin_op(op.clone()).await {
                    tracing::warn!(error = %e, "cannot renew the heal lease");
                }
            }
        })
    };
    let result = work.await;
    renewer.abort();
    if let Err(e) = vol.admin_op(lease(0)).await {
        tracing::warn!(error = %e, "cannot release the heal lease; it expires by itself");
    }
    result
}

pub async fn heal(vol: Arc<Volume>, opts: &Options, progress: &Progress) -> Result<Outcome> {
    let tally = under_lease(&vol, heal_under_lease(&vol, opts, progress)).await?;
    let name = &vol.config().name;
    progress.line(&format!(
        "heal {name}: copied {} chunks ({}), {} corrupt copies found, {} unreferenced chunks removed",
        tally.copied,
        crate::human(tally.copied_bytes),
        tally.corrupt,
        tally.collected
    ));
    Ok(if tally.left.is_empty() {
        Outcome::Healed
    } else {
        Outcome::Left(tally.left)
    })
}

async fn heal_under_lease(vol: &Volume, opts: &Options, progress: &Progress) -> Result<Tally> {
    let config = vol.config();
    let mut t = Tally::default();

    let (up, down) = brick_states(vol).await;
    for (b, why) in &down {
        t.left.push(format!(
            "brick {} (id {}) is unreachable, not healed: {why}",
            b.addr, b.id
        ));
    }
    if up.is_empty() {
        bail!("no brick of the volume answers");
    }

    // A follower that stays behind the leader runs the volume without its redundancy; heal
    // cannot fix that, but must not report the volume healed while it lasts.
    let statuses =
        futures::future::join_all(up.keys().map(|addr| admin::status(vol.pool(), addr))).await;
    let bricks: Vec<BrickRef> = vol.config().bricks().cloned().collect();
    for p in crate::replicas::problems(&bricks, &statuses, opts.max_lag_secs) {
        progress.line(&format!("metadata: {p}"));
        t.left.push(p);
    }
    if let Some(alarm) = compare_metadata(vol, &up, progress).await? {
        eprintln!("mortar: {alarm}");
        t.left.push(alarm);
    }

    if opts.full {
        let rate = opts
            .scrub_rate
            .unwrap_or_else(|| config.options.scrub_rate());
        scrub(vol, &up, rate, progress, &mut t).await?;
    }

    // What files name and what they let go, as the current leader knows it.
    let (referenced, released) = match namespace_references(vol, &up, &statuses).await {
        Ok(r) => r,
        Err(why) => {
            let why = format!("chunks: {why}; no chunk copied or collected in this run");
            progress.line(&why);
            t.left.push(why);
            return Ok(t);
        }
    };

    for (set_no, set) in config.replica_sets.iter().enumerate() {
        let set = &set.bricks;
        let set_up: Vec<&BrickRef> = set.iter().filter(|b| up.contains_key(&b.addr)).collect();
        if set_up.len() == set.len() {
            collect_garbage(
                vol,
                &set_up,
                &referenced,
                &released,
                opts.gc_grace_secs
                    .unwrap_or_else(|| config.options.gc_grace_secs()),
                &mut t,
            )
            .await?;
        }
        let set_referenced: Vec<ChunkId> = referenced
            .iter()
            .filter(|c| layout::replica_set_index(&config, c) == set_no)
            // During a layout change a moving chunk may still be on its old set only: the
            // rebalance copies it, heal does not look for it here.
            .filter(|c| layout::previous_set_index(&config, c).is_none())
            .copied()
            .collect();
        // A source found rotten while serving a copy removes itself, which makes a new gap:
        // go round again while copies succeed and the set still differs.
        let mut problems = Vec::new();
        for _round in 0..3 {
            let copied_before = t.copied;
            problems = copy_missing(vol, &set_up, &set_referenced, progress, &mut t).await?;
            if t.copied == copied_before || digest_differences(vol, &set_up).await?.is_empty() {
                break;
            }
        }
        t.left.extend(problems);
    }

    drain_heal_index(vol, &up, &referenced, &mut t).await?;

    // Settled? Writes in flight can leave a bucket briefly different; look again a few times.
    // A set being drained holds only copies on their way out: its bricks may differ.
    for set in config
        .replica_sets
        .iter()
        .filter(|s| !s.leaving)
        .map(|s| &s.bricks)
    {
        let set_up: Vec<&BrickRef> = set.iter().filter(|b| up.contains_key(&b.addr)).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let differing = digest_differences(vol, &set_up).await?.len();
            if differing == 0 {
                break;
            }
            if Instant::now() >= deadline {
                t.left.push(format!(
                    "replica set {}: chunk digests still differ in {differing} buckets (writes in progress?)",
                    set.iter().map(|b| b.addr.as_str()).collect::<Vec<_>>().join(",")
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(t)
}

/// Bricks that answer status (by address), and those that do not with why.
async fn brick_states(vol: &Volume) -> (BTreeMap<String, BrickRef>, Vec<(BrickRef, String)>) {
    let bricks: Vec<BrickRef> = vol.config().bricks().cloned().collect();
    let statuses =
        futures::future::join_all(bricks.iter().map(|b| admin::status(vol.pool(), &b.addr))).await;
    let mut up = BTreeMap::new();
    let mut down = Vec::new();
    for (b, s) in bricks.into_iter().zip(statuses) {
        match s {
            Ok(_) => {
                up.insert(b.addr.clone(), b);
            }
            Err(e) => down.push((b, e.to_string())),
        }
    }
    (up, down)
}

/// The chunks the namespace references now, read on the current metadata leader as
/// [`namespace_references`] reads them. Err: why not.
pub(crate) async fn referenced_now(vol: &Volume) -> Result<HashSet<ChunkId>, String> {
    let (up, _) = brick_states(vol).await;
    let statuses =
        futures::future::join_all(up.keys().map(|addr| admin::status(vol.pool(), addr))).await;
    namespace_references(vol, &up, &statuses)
        .await
        .map(|(referenced, _)| referenced)
}

/// The chunks the namespace references and the release records, read on the current metadata
/// leader — the brick saying "leader" in the highest term, which confirms it with a quorum for
/// every page — and only if afterwards it still leads in that term at an applied index at
/// least every replica's before the read. So garbage collection never judges from a stale
/// replica (a deposed leader cut off from the others still says "leader"). Err: why not.
async fn namespace_references(
    vol: &Volume,
    up: &BTreeMap<String, BrickRef>,
    statuses: &[Result<mortar_proto::wire::BrickStatus, admin::AdminError>],
) -> Result<(HashSet<ChunkId>, Vec<(ChunkId, u64)>), String> {
    let leader = crate::replicas::leader(statuses)
        .ok_or("no brick is the metadata leader, so what files reference is not known")?;
    let (term, id) = (leader.term, leader.id);
    let newest = statuses
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .map(|s| s.applied_index)
        .max()
        .unwrap_or(0);
    let addr = up
        .values()
        .find(|b| b.id == id)
        .map(|b| b.addr.clone())
        .ok_or_else(|| format!("the metadata leader (id {id}) is not a brick of the volume"))?;
    let pool = vol.pool();
    let referenced: HashSet<ChunkId> = admin::scan_references(pool, &addr)
        .await
        .map_err(|e| format!("cannot list the chunks files reference on the leader {addr}: {e}"))?
        .into_iter()
        .collect();
    let released = admin::list_released(pool, &addr)
        .await
        .map_err(|e| format!("cannot list released chunks on the leader {addr}: {e}"))?;
    let after = admin::status(pool, &addr)
        .await
        .map_err(|e| format!("the metadata leader {addr} stopped answering: {e}"))?;
    if after.raft_role != "leader" || after.term != term || after.applied_index < newest {
        return Err(format!(
            "the metadata leader {addr} changed or fell behind during the reference scan \
             (term {term} -> {}, applied {} against {newest} seen on a replica)",
            after.term, after.applied_index
        ));
    }
    Ok((referenced, released))
}

/// Compare the namespace digests of the reachable replicas once they sit at one applied index.
/// `Some` is the alarm: replicas that applied the same log differ.
async fn compare_metadata(
    vol: &Volume,
    up: &BTreeMap<String, BrickRef>,
    progress: &Progress,
) -> Result<Option<String>> {
    let deadline = Instant::now() + META_SETTLE;
    loop {
        let mut digests = Vec::new();
        for addr in up.keys() {
            let d = admin::meta_digest(vol.pool(), addr)
                .await
                .with_context(|| format!("cannot read the metadata digest of {addr}"))?;
            digests.push((addr.clone(), d));
        }
        let first = digests[0].1;
        if digests.iter().all(|(_, (index, _))| *index == first.0) {
            if let Some((addr, _)) = digests.iter().find(|(_, d)| d.1 != first.1) {
                return Ok(Some(format!(
                    "METADATA MISMATCH: bricks {} and {addr} applied the same log up to index {} \
                     but hold different namespaces; this must never happen — keep the bricks' \
                     data directories for analysis",
                    digests[0].0, first.0
                )));
            }
            progress.line(&format!(
                "metadata: {} replicas agree at index {}",
                digests.len(),
                first.0
            ));
            return Ok(None);
        }
        if Instant::now() >= deadline {
            // A busy volume keeps moving; that is not a fault, so note it and go on.
            progress.line("metadata: replicas kept applying new entries; not compared this run");
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scrub(
    vol: &Volume,
    up: &BTreeMap<String, BrickRef>,
    rate: u64,
    progress: &Progress,
    t: &mut Tally,
) -> Result<()> {
    let mut total = 0;
    for addr in up.keys() {
        total += admin::status(vol.pool(), addr)
            .await
            .map(|s| s.chunk_count)
            .unwrap_or(0);
    }
    let bar = progress.bar(total, "scrub: verifying every chunk");
    let results = futures::future::join_all(up.keys().map(|addr| {
        let bar = bar.clone();
        async move {
            let mut after = None;
            let mut corrupt = Vec::new();
            loop {
                let page = admin::scrub_page(vol.pool(), addr, after, SCRUB_PAGE, rate).await?;
                bar.inc(page.scanned);
                corrupt.extend(page.corrupt);
                match page.next {
                    Some(n) => after = Some(n),
                    None => return Ok::<_, admin::AdminError>((addr.clone(), corrupt)),
                }
            }
        }
    }))
    .await;
    bar.finish_and_clear();
    for r in results {
        let (addr, corrupt) = r.context("scrub failed")?;
        if !corrupt.is_empty() {
            progress.line(&format!(
                "scrub: {addr}: {} corrupt copies removed, to be replaced",
                corrupt.len()
            ));
        }
        t.corrupt += corrupt.len() as u64;
    }
    Ok(())
}

/// Chunks that may go: on some brick, named by no file, and not let go within the grace period.
fn gc_candidates(
    stored: &HashSet<ChunkId>,
    referenced: &HashSet<ChunkId>,
    released: &[(ChunkId, u64)],
    grace_secs: u64,
) -> Vec<ChunkId> {
    let recent: HashSet<&ChunkId> = released
        .iter()
        .filter(|(_, age)| *age < grace_secs)
        .map(|(c, _)| c)
        .collect();
    let mut out: Vec<ChunkId> = stored
        .iter()
        .filter(|c| !referenced.contains(c) && !recent.contains(c))
        .copied()
        .collect();
    out.sort_by_key(|c| c.0);
    out
}

async fn collect_garbage(
    vol: &Volume,
    set: &[&BrickRef],
    referenced: &HashSet<ChunkId>,
    released: &[(ChunkId, u64)],
    grace_secs: u64,
    t: &mut Tally,
) -> Result<()> {
    let mut stored = HashSet::new();
    for b in set {
        stored.extend(
            admin::list_chunks(vol.pool(), &b.addr)
                .await
                .with_context(|| format!("cannot list chunks on {}", b.addr))?,
        );
    }
    let candidates = gc_candidates(&stored, referenced, released, grace_secs);
    if candidates.is_empty() {
        return Ok(());
    }
    // Each brick re-checks its own stamp: a chunk stored again within the grace period (a
    // writer about to reference it) stays.
    let mut removed_everywhere: HashSet<ChunkId> = candidates.iter().copied().collect();
    for b in set {
        let removed: HashSet<ChunkId> =
            admin::collect_garbage(vol.pool(), &b.addr, &candidates, grace_secs)
                .await
                .with_context(|| format!("garbage collection on {}", b.addr))?
                .into_iter()
                .collect();
        t.collected = t.collected.max(removed.len() as u64);
        let present = admin::has_chunks(vol.pool(), &b.addr, &candidates).await?;
        for (c, here) in candidates.iter().zip(present) {
            if here && !removed.contains(c) {
                removed_everywhere.remove(c);
            }
        }
    }
    // Release records of chunks that are gone, and of chunks named again, are no longer needed.
    let forget: Vec<ChunkId> = released
        .iter()
        .filter(|(c, age)| {
            removed_everywhere.contains(c) || (referenced.contains(c) && *age >= grace_secs)
        })
        .map(|(c, _)| *c)
        .collect();
    for batch in forget.chunks(1000) {
        vol.admin_op(MetaOp::ForgetReleased(batch.to_vec()))
            .await
            .context("cannot drop release records")?;
    }
    // Deleted chunks' space goes back to the filesystem within this run.
    if !removed_everywhere.is_empty() {
        for b in set {
            let (before, after) = admin::reclaim_space(vol.pool(), &b.addr)
                .await
                .with_context(|| format!("reclaiming space on {}", b.addr))?;
            if after != before {
                println!(
                    "space: {} takes {} on disk, was {}",
                    b.addr,
                    crate::human(after),
                    crate::human(before)
                );
            }
        }
    }
    Ok(())
}

async fn digests(vol: &Volume, set: &[&BrickRef]) -> Result<Vec<Vec<Bucket>>> {
    let mut out = Vec::new();
    for b in set {
        out.push(
            admin::chunk_digest(vol.pool(), &b.addr)
                .await
                .with_context(|| format!("cannot read the chunk digest of {}", b.addr))?,
        );
    }
    Ok(out)
}

fn differences(digests: &[Vec<Bucket>]) -> Vec<u16> {
    let refs: Vec<&[Bucket]> = digests.iter().map(|d| d.as_slice()).collect();
    differing_buckets(&refs)
}

async fn digest_differences(vol: &Volume, set: &[&BrickRef]) -> Result<Vec<u16>> {
    Ok(differences(&digests(vol, set).await?))
}

/// For chunks seen on some bricks: which of `bricks` lack which.
fn missing_by_brick(listings: &[(BrickId, HashSet<ChunkId>)]) -> BTreeMap<BrickId, Vec<ChunkId>> {
    let union: HashSet<&ChunkId> = listings.iter().flat_map(|(_, s)| s.iter()).collect();
    let mut out = BTreeMap::new();
    for (brick, have) in listings {
        let mut lack: Vec<ChunkId> = union
            .iter()
            .filter(|c| !have.contains(c))
            .map(|c| **c)
            .collect();
        if !lack.is_empty() {
            lack.sort_by_key(|c| c.0);
            out.insert(*brick, lack);
        }
    }
    out
}

async fn copy_missing(
    vol: &Volume,
    set: &[&BrickRef],
    referenced: &[ChunkId],
    progress: &Progress,
    t: &mut Tally,
) -> Result<Vec<String>> {
    let pool = vol.pool();
    let mut problems = Vec::new();
    // What each brick holds, restricted to what matters: differing buckets and referenced chunks.
    let mut listings: Vec<(BrickId, HashSet<ChunkId>)> =
        set.iter().map(|b| (b.id, HashSet::new())).collect();
    let differing = digest_differences(vol, set).await?;
    for (b, (_, have)) in set.iter().zip(listings.iter_mut()) {
        let pages: Vec<_> = stream::iter(&differing)
            .map(|bucket| admin::list_bucket(pool, &b.addr, *bucket))
            .buffer_unordered(LIST_IN_FLIGHT)
            .collect()
            .await;
        for page in pages {
            have.extend(page?);
        }
    }
    let mut lost = 0usize;
    if !referenced.is_empty() {
        let mut anywhere = vec![false; referenced.len()];
        for (b, (_, have)) in set.iter().zip(listings.iter_mut()) {
            let present = admin::has_chunks(pool, &b.addr, referenced).await?;
            for ((c, here), seen) in referenced.iter().zip(present).zip(anywhere.iter_mut()) {
                if here {
                    have.insert(*c);
                    *seen = true;
                }
            }
        }
        for (c, seen) in referenced.iter().zip(anywhere) {
            if !seen {
                lost += 1;
                if lost <= 10 {
                    problems.push(format!(
                        "chunk {} is referenced by a file but no reachable brick holds a good copy",
                        c.to_hex()
                    ));
                }
            }
        }
        if lost > 10 {
            problems.push(format!(
                "... {} more referenced chunks without a copy",
                lost - 10
            ));
        }
    }
    let missing = missing_by_brick(&listings);
    let total: usize = missing.values().map(|v| v.len()).sum();
    if total == 0 {
        return Ok(problems);
    }
    let bar = progress.bar(total as u64, &format!("copying {total} missing chunks"));
    let mut copied = 0u64;
    for (brick, ids) in &missing {
        let target = set.iter().find(|b| b.id == *brick).expect("listed brick");
        let sources: Vec<String> = set
            .iter()
            .filter(|b| b.id != *brick)
            .map(|b| b.addr.clone())
            .collect();
        let mut failed = 0usize;
        for batch in ids.chunks(FETCH_BATCH) {
            let results = admin::fetch_chunks(pool, &target.addr, batch, &sources)
                .await
                .with_context(|| format!("copying chunks to {}", target.addr))?;
            for (c, r) in batch.iter().zip(results) {
                match r {
                    Ok(bytes) => {
                        copied += 1;
                        t.copied_bytes += bytes;
                    }
                    Err(why) => {
                        failed += 1;
                        if failed <= 10 {
                            problems.push(format!(
                                "chunk {} not copied to {}: {why}",
                                c.to_hex(),
                                target.addr
                            ));
                        }
                    }
                }
            }
            bar.inc(batch.len() as u64);
        }
        if failed > 10 {
            problems.push(format!(
                "... {} more chunks not copied to {}",
                failed - 10,
                target.addr
            ));
        }
    }
    bar.finish_and_clear();
    t.copied += copied;
    progress.line(&format!(
        "copied {copied} of {total} missing chunks between bricks {}",
        set.iter()
            .map(|b| b.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    ));
    Ok(problems)
}

/// Which of these (brick, chunk) pairs hold: one batched question per reachable brick.
async fn holdings(
    vol: &Volume,
    up: &BTreeMap<String, BrickRef>,
    pairs: impl Iterator<Item = (BrickId, ChunkId)>,
) -> Result<HashSet<(BrickId, ChunkId)>> {
    // Heal indexes of different bricks may record the same miss: each pair is asked once.
    let mut seen = HashSet::new();
    let mut asked: BTreeMap<BrickId, Vec<ChunkId>> = BTreeMap::new();
    for (b, c) in pairs.filter(|pair| seen.insert(*pair)) {
        asked.entry(b).or_default().push(c);
    }
    let mut held = HashSet::new();
    for b in up.values() {
        if let Some(ids) = asked.get(&b.id) {
            let present = admin::has_chunks(vol.pool(), &b.addr, ids).await?;
            held.extend(
                ids.iter()
                    .zip(present)
                    .filter(|(_, here)| *here)
                    .map(|(c, _)| (b.id, *c)),
            );
        }
    }
    Ok(held)
}

/// Drop heal index entries whose brick now holds the chunk, or whose chunk no file needs and no
/// brick holds any more (collected garbage). Every index is read first, so bricks are asked
/// about all of them together rather than once per index.
async fn drain_heal_index(
    vol: &Volume,
    up: &BTreeMap<String, BrickRef>,
    referenced: &HashSet<ChunkId>,
    t: &mut Tally,
) -> Result<()> {
    let pool = vol.pool();
    let mut indexes = Vec::with_capacity(up.len());
    for addr in up.keys() {
        indexes.push((addr, admin::list_heal_index(pool, addr).await?));
    }
    let every_entry = || indexes.iter().flat_map(|(_, entries)| entries);
    let held = holdings(vol, up, every_entry().map(|e| (e.brick, e.chunk))).await?;
    let unneeded: HashSet<ChunkId> = every_entry()
        .filter(|e| !referenced.contains(&e.chunk))
        .map(|e| e.chunk)
        .collect();
    let still_stored = holdings(
        vol,
        up,
        up.values()
            .flat_map(|b| unneeded.iter().map(move |c| (b.id, *c))),
    )
    .await?;
    let still_stored: HashSet<ChunkId> = still_stored.into_iter().map(|(_, c)| c).collect();
    let mut remaining = 0usize;
    for (addr, entries) in &indexes {
        let done: Vec<(BrickId, ChunkId)> = entries
            .iter()
            .filter(|e| {
                held.contains(&(e.brick, e.chunk))
                    || (!referenced.contains(&e.chunk) && !still_stored.contains(&e.chunk))
                    // A replaced brick's misses: its replacement was healed by digest above.
                    || vol.config().brick(e.brick).is_none()
            })
            .map(|e| (e.brick, e.chunk))
            .collect();
        admin::clear_heal_index(pool, addr, &done).await?;
        remaining += entries.len() - done.len();
    }
    if remaining > 0 {
        t.left.push(format!(
            "{remaining} heal index entries remain (their bricks are down or copies failed)"
        ));
    }
    Ok(())
}

#[derive(Default, Debug, PartialEq, Eq)]
struct Pending {
    missing: u64,
    missing_bytes: u64,
    corrupt: u64,
    corrupt_bytes: u64,
}

/// Heal index entries from every reporting brick, counted once per (brick, chunk).
fn pending_by_brick(entries: &[HealEntry]) -> BTreeMap<BrickId, Pending> {
    let mut seen = HashSet::new();
    let mut out: BTreeMap<BrickId, Pending> = BTreeMap::new();
    for e in entries {
        if !seen.insert((e.brick, e.chunk)) {
            continue;
        }
        let p = out.entry(e.brick).or_default();
        match e.reason {
            HealReason::MissedWrite => {
                p.missing += 1;
                p.missing_bytes += e.bytes;
            }
            HealReason::Corrupt => {
                p.corrupt += 1;
                p.corrupt_bytes += e.bytes;
            }
        }
    }
    out
}

/// `heal VOLUME info`: what is pending, from heal indexes and digests only. Returns whether
/// anything is pending.
pub async fn info(vol: &Volume) -> Result<bool> {
    let (up, down) = brick_states(vol).await;
    let mut entries = Vec::new();
    for addr in up.keys() {
        entries.extend(admin::list_heal_index(vol.pool(), addr).await?);
    }
    // A write can miss a brick that already held the chunk (same content elsewhere): where the
    // brick answers, count only what it really lacks.
    let held = holdings(vol, &up, entries.iter().map(|e| (e.brick, e.chunk))).await?;
    let really_missing: Vec<HealEntry> = entries
        .into_iter()
        .filter(|e| !held.contains(&(e.brick, e.chunk)))
        .collect();
    let pending = pending_by_brick(&really_missing);
    let mut anything = !down.is_empty() || !pending.is_empty();
    println!("Heal info for volume: {}", vol.config().name);
    println!(
        "{:<22} {:<20} {:<4} {:>9} {:>9} {:>9} {:>12}",
        "Brick", "ID", "Up", "Chunks", "Missing", "Corrupt", "Pending"
    );
    for (set_no, set) in vol.config().replica_sets.iter().enumerate() {
        let set = &set.bricks;
        let set_up: Vec<&BrickRef> = set.iter().filter(|b| up.contains_key(&b.addr)).collect();
        // One digest per answering brick serves both the chunk counts and the comparison.
        let set_digests = digests(vol, &set_up).await?;
        let counts: HashMap<BrickId, u64> = set_up
            .iter()
            .zip(&set_digests)
            .map(|(b, d)| (b.id, d.iter().map(|x| x.count).sum()))
            .collect();
        for b in set {
            let p = pending.get(&b.id);
            let (missing, corrupt, bytes) = p
                .map(|p| (p.missing, p.corrupt, p.missing_bytes + p.corrupt_bytes))
                .unwrap_or_default();
            match counts.get(&b.id) {
                Some(n) => println!(
                    "{:<22} {:<20} {:<4} {:>9} {:>9} {:>9} {:>12}",
                    b.addr,
                    b.id,
                    "Y",
                    n,
                    missing,
                    corrupt,
                    crate::human(bytes)
                ),
                None => println!(
                    "{:<22} {:<20} {:<4} {:>9} {:>9} {:>9} {:>12}",
                    b.addr,
                    b.id,
                    "N",
                    "-",
                    missing,
                    corrupt,
                    crate::human(bytes)
                ),
            }
        }
        let differing = differences(&set_digests).len();
        anything |= differing > 0;
        println!(
            "Replica set {}: chunk digests differ in {differing} of {} buckets{}",
            set_no + 1,
            mortar_proto::digest::BUCKETS,
            if set_up.len() < set.len() {
                " (among the bricks that answer)"
            } else {
                ""
            }
        );
    }
    for (b, why) in &down {
        println!("Brick {} is unreachable: {why}", b.addr);
    }
    println!(
        "Status: {}",
        if anything {
            "heal pending"
        } else {
            "fully healed"
        }
    );
    Ok(anything)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    #[test]
    fn missing_is_the_union_minus_each_listing() {
        let listings = vec![
            (1, HashSet::from([id(1), id(2)])),
            (2, HashSet::from([id(2)])),
            (3, HashSet::from([id(1), id(2), id(3)])),
        ];
        let m = missing_by_brick(&listings);
        let sorted = |mut v: Vec<ChunkId>| {
            v.sort_by_key(|c| c.0);
            v
        };
        assert_eq!(m[&1], vec![id(3)]);
        assert_eq!(m[&2], sorted(vec![id(1), id(3)]));
        assert!(!m.contains_key(&3));
    }

    #[test]
    fn garbage_excludes_referenced_and_recently_released() {
        let stored = HashSet::from([id(1), id(2), id(3), id(4)]);
        let referenced = HashSet::from([id(1)]);
        let released = vec![(id(2), 10), (id(3), 7200)];
        assert_eq!(gc_candidates(&stored, &referenced, &released, 3600), {
            let mut v = vec![id(3), id(4)];
            v.sort_by_key(|c| c.0);
            v
        });
        assert_eq!(gc_candidates(&stored, &referenced, &released, 0).len(), 3);
    }

    #[test]
    fn pending_counts_each_brick_chunk_once() {
        let e = |brick, n, reason| HealEntry {
            brick,
            chunk: id(n),
            reason,
            bytes: 100,
        };
        let entries = vec![
            e(1, 1, HealReason::MissedWrite),
            e(1, 1, HealReason::MissedWrite),
            e(1, 2, HealReason::Corrupt),
            e(2, 1, HealReason::MissedWrite),
        ];
        let p = pending_by_brick(&entries);
        assert_eq!(
            p[&1],
            Pending {
                missing: 1,
                missing_bytes: 100,
                corrupt: 1,
                corrupt_bytes: 100
            }
        );
        assert_eq!(p[&2].missing, 1);
    }
}
