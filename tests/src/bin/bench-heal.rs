//! Heal at scale: a volume of FILES small files (one chunk each), one brick away while MISSED
//! more are written, then `heal info`, `heal` and `heal --full` timed through the real CLI.
//! Usage: bench-heal [FILES] [MISSED]

use futures::stream::{self, StreamExt};
use mortar_tests::mortar_client::{volume_admin, Volume};
use mortar_tests::mortar_proto::ROOT_INODE;
use mortar_tests::{wait_for, Cluster, DEADLINE};
use std::time::Instant;

const FILE_SIZE: usize = 40 * 1024;

async fn write_files(vol: &Volume, prefix: &str, n: usize) {
    stream::iter(0..n)
        .map(|i| async move {
            let name = format!("{prefix}{i}");
            let a = vol
                .create(ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
                .await
                .expect("create");
            let mut body = vec![0u8; FILE_SIZE];
            blake3::Hasher::new()
                .update(name.as_bytes())
                .finalize_xof()
                .fill(&mut body);
            vol.write(a.ino, 0, &body, false).await.expect("write");
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;
}

fn timed_heal(c: &Cluster, args: &[&str]) -> (f64, i32, String) {
    let bricks = c.addrs().join(",");
    let mut all = vec!["volume", "heal", "bench"];
    all.extend(args);
    all.extend(["--bricks", &bricks]);
    let t = Instant::now();
    let o = c.cli(&all);
    (
        t.elapsed().as_secs_f64(),
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().ok());
    let files = args.next().flatten().unwrap_or(5000);
    let missed = args.next().flatten().unwrap_or(1000);
    let mut c = Cluster::start(3);
    let vol = c.create_volume("bench", 64 * 1024).await;
    let t = Instant::now();
    write_files(&vol, "f", files).await;
    println!(
        "wrote {files} files of {} KiB in {:.1} s",
        FILE_SIZE / 1024,
        t.elapsed().as_secs_f64()
    );
    let (secs, code, _) = timed_heal(&c, &["info"]);
    println!("heal info, healthy volume: {secs:.2} s (exit {code})");

    c.bricks[2].stop();
    write_files(&vol, "m", missed).await;
    c.bricks[2].start();
    let pool = c.admin_pool();
    let addr = c.addrs()[2].clone();
    wait_for("brick 2 to answer", DEADLINE, || {
        let (pool, addr) = (pool.clone(), addr.clone());
        async move { volume_admin::status(&pool, &addr).await.ok() }
    })
    .await;

    let (secs, code, out) = timed_heal(&c, &["info"]);
    println!("heal info, {missed} chunks pending: {secs:.2} s (exit {code})");
    print!("{out}");
    let (secs, code, out) = timed_heal(&c, &[]);
    println!(
        "heal, {missed} chunks to copy: {secs:.2} s = {:.0} chunks/s (exit {code})",
        missed as f64 / secs
    );
    print!("{out}");
    let (secs, code, _) = timed_heal(&c, &[]);
    println!("heal, nothing to do: {secs:.2} s (exit {code})");
    let total = files + missed;
    let (secs, code, _) = timed_heal(&c, &["--full", "--scrub-rate", "0"]);
    println!(
        "heal --full, {total} chunks per brick verified: {secs:.2} s = {:.1} MiB/s per brick (exit {code})",
        (total * FILE_SIZE) as f64 / (1 << 20) as f64 / secs
    );
}
