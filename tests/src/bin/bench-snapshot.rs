//! Snapshots at scale: a three-brick volume holding ENTRIES files (one in 200 of 1 MiB, the
//! rest 2 KiB) in directories of 1,000, written through a FUSE mount; then `mortar snapshot
//! create` timed through the real CLI (three times), against `cp -al` of the same tree on a
//! local disk (the cheapest local snapshot: hard links, no data copied). Prints the bricks'
//! disk use before and after, and after 1% of the files changed, the time to restore, and
//! the time to clone a snapshot into a new volume (against `cp -al` again) and the disk it
//! takes.
//! Usage: bench-snapshot [ENTRIES]

use mortar_tests::{Cluster, Run};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PER_DIR: usize = 1000;
const LARGE_EVERY: usize = 200;

fn body(i: usize, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .finalize_xof()
        .fill(&mut b);
    b
}

/// Write the tree: `n` files under `root`, four threads.
fn make(root: &Path, n: usize) -> u64 {
    let dirs = n.div_ceil(PER_DIR);
    for d in 0..dirs {
        std::fs::create_dir_all(root.join(format!("d{d}"))).unwrap();
    }
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for i in (t..n).step_by(4) {
                    let len = if i % LARGE_EVERY == 0 { 1 << 20 } else { 2048 };
                    let p = root.join(format!("d{}/f{i}", i / PER_DIR));
                    std::fs::write(p, body(i, len)).unwrap();
                }
            });
        }
    });
    (0..n)
        .map(|i| {
            if i % LARGE_EVERY == 0 {
                1u64 << 20
            } else {
                2048
            }
        })
        .sum()
}

/// Bytes under `dir` on disk (apparent sizes of every file).
fn disk_use(dir: &Path) -> u64 {
    let out = Command::new("du").args(["-sb"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn bricks_use(c: &Cluster) -> u64 {
    (0..3)
        .map(|i| disk_use(&c.dir.path().join(format!("brick{i}"))))
        .sum()
}

fn timed(what: &str, f: impl FnOnce() -> Run) -> Duration {
    let t = Instant::now();
    let run = f();
    let took = t.elapsed();
    assert_eq!(run.code, 0, "{what}: {}", run.out);
    took
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<usize>().ok())
        .unwrap_or(100_000);
    let c = Cluster::start(3);
    c.create_volume("www", 1 << 20).await;
    let m = c.mount("www", "m", "").await;
    let local = c.dir.path().join("local");
    std::fs::create_dir_all(&local).unwrap();

    let t = Instant::now();
    let bytes = make(&m.path.join("site"), n);
    // fsyncdir commits what the mount holds under its delegations.
    assert!(Command::new("sync")
        .arg(m.path.join("site"))
        .status()
        .unwrap()
        .success());
    eprintln!(
        "wrote {n} files ({:.0} MiB) through the mount in {:?}",
        mib(bytes),
        t.elapsed()
    );
    make(&local.join("site"), n);
    let before = bricks_use(&c);

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for k in 0..3 {
        let name = format!("s{k}");
        ours.push(timed("snapshot create", || {
            c.snapshot_cli("create", &[&name])
        }));
        let t = Instant::now();
        let status = Command::new("cp")
            .arg("-al")
            .arg(local.join("site"))
            .arg(local.join(format!("snap{k}")))
            .status()
            .unwrap();
        assert!(status.success());
        theirs.push(t.elapsed());
    }
    let after = bricks_use(&c);

    // 1% of the files change.
    let t = Instant::now();
    for i in (0..n).step_by(100) {
        let p = m.path.join(format!("site/d{}/f{i}", i / PER_DIR));
        std::fs::write(p, body(i + 1, 2048)).unwrap();
    }
    assert!(Command::new("sync")
        .arg(m.path.join("site"))
        .status()
        .unwrap()
        .success());
    eprintln!("changed {} files in {:?}", n / 100, t.elapsed());
    let changed = bricks_use(&c);
    let restore = timed("snapshot restore", || {
        c.snapshot_cli("restore", &["s0", "--undo", "undo"])
    });
    let list = timed("snapshot list", || c.snapshot_cli("list", &[]));
    let restored = bricks_use(&c);
    let clone = timed("snapshot clone", || {
        c.snapshot_cli("clone", &["s1", "www-staging"])
    });
    let cloned = bricks_use(&c);
    let t = Instant::now();
    let status = Command::new("cp")
        .arg("-al")
        .arg(local.join("site"))
        .arg(local.join("clone"))
        .status()
        .unwrap();
    assert!(status.success());
    let cp_clone = t.elapsed();

    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        "| snapshots, {n} entries, {:.0} MiB | local dir (cp -al) | mortar | mortar / local |",
        mib(bytes)
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| snapshot create (median of 3) | {:.3} s | {:.3} s | {:.2} |",
        theirs.as_secs_f64(),
        ours.as_secs_f64(),
        ours.as_secs_f64() / theirs.as_secs_f64()
    );
    println!(
        "| snapshot restore after 1% changed | | {:.3} s | |",
        restore.as_secs_f64()
    );
    println!(
        "| snapshot list (5 snapshots, with usage) | | {:.3} s | |",
        list.as_secs_f64()
    );
    println!(
        "| snapshot clone into a new volume | {:.3} s | {:.3} s | {:.2} |",
        cp_clone.as_secs_f64(),
        clone.as_secs_f64(),
        clone.as_secs_f64() / cp_clone.as_secs_f64()
    );
    println!(
        "| bricks' disk use: before / after the clone | | {:.0} / {:.0} MiB | |",
        mib(restored),
        mib(cloned)
    );
    println!(
        "| bricks' disk use: before / after 3 snapshots / after 1% changed | | {:.0} / {:.0} / {:.0} MiB | |",
        mib(before),
        mib(after),
        mib(changed)
    );
    println!(
        "| growth from 3 snapshots, then from 1% changed | | {:+.1} / {:+.1} MiB (the volume: {:.0} MiB, three copies {:.0} MiB) | |",
        mib(after) - mib(before),
        mib(changed) - mib(after),
        mib(bytes),
        3.0 * mib(bytes)
    );
}
