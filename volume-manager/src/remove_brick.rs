//! `mortar volume remove-brick VOL B1 B2 B3 start|status|commit`: drain one replica set and
//! take it out of the volume. `start` makes the leader take the set out of the placement (its
//! chunks move to the sets their next highest weight names) and runs the move as a rebalance
//! does; `commit` takes the drained set out of the volume and retires its bricks, and is
//! refused, naming what is left, until every chunk a file references is on every brick of its
//! set elsewhere.

use crate::heal::{self, Progress};
use crate::rebalance::{self, Outcome};
use anyhow::{anyhow, bail, Result};
use mortar_client::volume_admin as admin;
use mortar_client::Volume;
use mortar_proto::{layout, ChunkId, VolumeConfig};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Chunk ids asked about per request in the commit's check.
const CHECK_BATCH: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Status,
    Commit,
}

/// `B1 B2 B3 start|status|commit` as the command line gives it.
pub fn parse(spec: &[String]) -> Result<(Vec<String>, Action)> {
    let usage = "remove-brick takes the bricks of one replica set, then start, status or commit";
    let Some((last, bricks)) = spec.split_last() else {
        bail!("{usage}");
    };
    let action = match last.as_str() {
        "start" => Action::Start,
        "status" => Action::Status,
        "commit" => Action::Commit,
        other => bail!("{usage}; got '{other}' where start, status or commit goes"),
    };
    if bricks.is_empty() {
        bail!("{usage}; no brick given");
    }
    Ok((bricks.to_vec(), action))
}

fn via(vol: &Volume) -> Vec<String> {
    vol.config().bricks().map(|b| b.addr.clone()).collect()
}

fn set_desc(config: &VolumeConfig, i: usize) -> String {
    let s = &config.replica_sets[i];
    let b: Vec<&str> = s.bricks.iter().map(|b| b.addr.as_str()).collect();
    format!("replica set {} ({})", s.id, b.join(" "))
}

/// Start (or go on with) the drain; the exit status as `rebalance start` gives it.
pub async fn start(
    vol: Arc<Volume>,
    name: &str,
    bricks: &[String],
    opts: &rebalance::Options,
) -> Result<i32> {
    let config = admin::remove_brick(vol.pool(), &via(&vol), bricks, false)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let i = config
        .set_at(bricks)
        .ok_or_else(|| anyhow!("the volume no longer has a replica set of these bricks"))?;
    println!(
        "remove-brick {name}: draining {}; its chunks move to the other sets",
        set_desc(&config, i)
    );
    vol.refresh_config().await?;
    let args = bricks.join(" ");
    match rebalance::start(vol, opts, &Progress::new()).await? {
        Outcome::Completed(s) => {
            println!(
                "remove-brick {name}: drained: {} chunks scanned, {} moved ({}); run \
                 'mortar volume remove-brick {name} {args} commit' to take the set out",
                s.scanned,
                s.moved,
                crate::human(s.moved_bytes)
            );
            Ok(0)
        }
        Outcome::NothingToDo => {
            println!(
                "remove-brick {name}: drained; run 'mortar volume remove-brick {name} {args} \
                 commit' to take the set out"
            );
            Ok(0)
        }
        Outcome::Stopped(s) => {
            println!(
                "remove-brick {name}: stopped after {} chunks scanned; 'start' goes on from there",
                s.scanned
            );
            Ok(1)
        }
    }
}

/// What the drain has done and what is left.
pub async fn status(vol: &Volume, name: &str, bricks: &[String]) -> Result<()> {
    let config = vol.refresh_config().await?;
    let Some(i) = config.set_at(bricks) else {
        if bricks
            .iter()
            .all(|a| config.retired.iter().any(|b| &b.addr == a))
        {
            println!("remove-brick {name}: committed; these bricks are out of the volume");
            return Ok(());
        }
        bail!("these bricks are not one replica set of volume '{name}'");
    };
    if !config.replica_sets[i].leaving {
        bail!("remove-brick of {} was not started", set_desc(&config, i));
    }
    println!(
        "Remove-brick of {} from volume {name}:",
        set_desc(&config, i)
    );
    match &config.previous {
        Some(_) => println!("  layout: draining (epoch {})", config.epoch),
        None => println!(
            "  layout: drained (epoch {}); ready to commit",
            config.epoch
        ),
    }
    if let Some(s) = vol.rebalance_state().await? {
        for line in rebalance::describe(&s) {
            println!("  {line}");
        }
    }
    for b in &config.replica_sets[i].bricks {
        match admin::status(vol.pool(), &b.addr).await {
            Ok(s) => println!("  {}: {} chunks still held", b.addr, s.chunk_count),
            Err(e) => println!("  {}: does not answer: {e}", b.addr),
        }
    }
    Ok(())
}

/// Take the drained set out, once every chunk files reference is on every brick of its set.
pub async fn commit(vol: &Volume, name: &str, bricks: &[String]) -> Result<()> {
    let config = vol.refresh_config().await?;
    // The leader refuses what is not drained yet (and finishes a commit cut short); the
    // chunks are checked only when it would go ahead.
    if let Some(i) = config.set_at(bricks) {
        if config.replica_sets[i].leaving && config.previous.is_none() {
            let short = under_copied(vol, &config).await?;
            if let Some((id, held, want)) = short.first() {
                bail!(
                    "{} chunks files reference are not on every brick of their set yet (chunk \
                     {id} is on {held} of {want}); run 'mortar volume remove-brick {name} {} \
                     start' again or 'mortar volume heal {name}', then commit",
                    short.len(),
                    bricks.join(" ")
                );
            }
        }
    }
    let after = admin::remove_brick(vol.pool(), &via(vol), bricks, true)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    println!(
        "remove-brick {name}: committed; the volume is {} x 3 = {} (layout epoch {}); the \
         removed bricks may be stopped",
        after.replica_sets.len(),
        after.bricks().count(),
        after.epoch
    );
    Ok(())
}

/// The referenced chunks some brick of their set does not hold: (chunk, copies, bricks).
async fn under_copied(vol: &Volume, config: &VolumeConfig) -> Result<Vec<(ChunkId, usize, usize)>> {
    let referenced = heal::referenced_now(vol)
        .await
        .map_err(|why| anyhow!("cannot check the chunks before the commit: {why}"))?;
    let mut ids: Vec<ChunkId> = referenced.into_iter().collect();
    ids.sort_unstable();
    let mut short = Vec::new();
    for (set, ids) in layout::by_set(config, &ids) {
        let bricks = &config.replica_sets[set].bricks;
        for batch in ids.chunks(CHECK_BATCH) {
            let mut held: BTreeMap<usize, usize> = BTreeMap::new();
            for b in bricks {
                let present = admin::has_chunks(vol.pool(), &b.addr, batch)
                    .await
                    .map_err(|e| anyhow!("cannot ask {} which chunks it holds: {e}", b.addr))?;
                for (i, here) in present.into_iter().enumerate() {
                    *held.entry(i).or_default() += usize::from(here);
                }
            }
            for (i, id) in batch.iter().enumerate() {
                let n = held.get(&i).copied().unwrap_or(0);
                if n < bricks.len() {
                    short.push((*id, n, bricks.len()));
                }
            }
        }
    }
    Ok(short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn the_action_comes_last_and_bricks_before_it() {
        let (b, a) = parse(&args("h:1 h:2 h:3 commit")).unwrap();
        assert_eq!((b.len(), a), (3, Action::Commit));
        for bad in ["h:1 h:2 h:3", "start", "", "h:1 h:2 h:3 go"] {
            let e = parse(&args(bad)).unwrap_err().to_string();
            assert!(e.contains("start, status or commit"), "{bad}: {e}");
        }
    }
}
