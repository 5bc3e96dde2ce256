//! Rebalance at scale: a three-brick volume holding MIB MiB of 1 MiB files and 2,000 small
//! files, then `add-brick` of three more and `rebalance start` timed through the real CLI,
//! while a reader reads the small files in a loop on its own client. Prints the MiB/s moved
//! and the reader's throughput during the rebalance as a share of its throughput before.
//! Usage: bench-rebalance [MIB]

use futures::stream::{self, StreamExt};
use mortar_tests::mortar_client::{volume_admin, Volume};
use mortar_tests::mortar_proto::{InodeId, ROOT_INODE};
use mortar_tests::{wait_for, Cluster, DEADLINE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIG: usize = 1 << 20;
const SMALL: usize = 2000;
const SMALL_SIZE: usize = 6 * 1024;
/// How long the reader's rate is measured before the rebalance.
const BASELINE: Duration = Duration::from_secs(10);
/// How long the reader runs before its rate is measured.
const SETTLE: Duration = Duration::from_secs(20);

fn body(name: &str, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    blake3::Hasher::new()
        .update(name.as_bytes())
        .finalize_xof()
        .fill(&mut b);
    b
}

async fn write_files(vol: &Volume, prefix: &str, n: usize, len: usize) -> Vec<InodeId> {
    stream::iter(0..n)
        .map(|i| async move {
            let name = format!("{prefix}{i}");
            let a = vol
                .create(ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
                .await
                .expect("create");
            vol.write(a.ino, 0, &body(&name, len), false)
                .await
                .expect("write");
            a.ino
        })
        .buffered(8)
        .collect()
        .await
}

/// Read the small files in turn until stopped, counting the reads and any that failed.
fn start_reader(
    vol: Arc<Volume>,
    files: Vec<InodeId>,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut failed = 0;
        while !stop.load(Ordering::Relaxed) {
            for ino in &files {
                match vol.read(*ino, 0, SMALL_SIZE as u64).await {
                    Ok(b) if b.len() == SMALL_SIZE => {}
                    _ => failed += 1,
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }
        failed
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<usize>().ok())
        .unwrap_or(512);
    let mut c = Cluster::start(3);
    let vol = c.create_volume("www", BIG as u32).await;
    let t = Instant::now();
    write_files(&vol, "big", mib, BIG).await;
    let small = write_files(&vol, "s", SMALL, SMALL_SIZE).await;
    println!(
        "wrote {mib} files of 1 MiB and {SMALL} of {} KiB in {:.1} s",
        SMALL_SIZE / 1024,
        t.elapsed().as_secs_f64()
    );

    let reader = Arc::new(
        Volume::with_pool(c.admin_pool(), &c.addrs(), "www")
            .await
            .expect("reader client"),
    );
    let (stop, reads) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let task = start_reader(reader, small, stop.clone(), reads.clone());
    // The bricks flush and compact what was just written; the reader's rate is taken after.
    tokio::time::sleep(SETTLE).await;
    let settled = reads.load(Ordering::Relaxed);
    tokio::time::sleep(BASELINE).await;
    let before = (reads.load(Ordering::Relaxed) - settled) as f64 / BASELINE.as_secs_f64();

    let new: Vec<usize> = (0..3).map(|_| c.add_brick()).collect();
    let pool = c.admin_pool();
    for i in &new {
        let addr = c.bricks[*i].addr.clone();
        wait_for("a new brick to answer", DEADLINE, || {
            let (pool, addr) = (pool.clone(), addr.clone());
            async move { volume_admin::hello(&pool, &addr).await.ok() }
        })
        .await;
    }
    let addrs: Vec<String> = new.iter().map(|i| c.bricks[*i].addr.clone()).collect();
    let args: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let r = c.volume_cli("add-brick", &args);
    assert_eq!(r.code, 0, "add-brick: {}", r.out);
    let reads_at = reads.load(Ordering::Relaxed);
    let t = Instant::now();
    let r = c.volume_cli("rebalance", &["start"]);
    let secs = t.elapsed().as_secs_f64();
    let during = (reads.load(Ordering::Relaxed) - reads_at) as f64 / secs;
    stop.store(true, Ordering::Relaxed);
    let failed = task.await.expect("reader");
    assert_eq!(r.code, 0, "rebalance: {}", r.out);
    let s = vol
        .rebalance_state()
        .await
        .expect("rebalance state")
        .expect("a rebalance ran");
    println!(
        "rebalance: {} chunks scanned, {} moved ({:.0} MiB) in {secs:.1} s = {:.1} MiB/s moved",
        s.scanned,
        s.moved,
        s.moved_bytes as f64 / (1 << 20) as f64,
        s.moved_bytes as f64 / (1 << 20) as f64 / secs
    );
    println!(
        "reader: {before:.0} reads/s before, {during:.0} reads/s during = {:.2} of before; {failed} failed",
        during / before
    );
}
