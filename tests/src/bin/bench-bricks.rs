//! Micro-benchmark of the brick write path: replicated chunk writes (client -> one brick ->
//! two peers, quorum ack) against the same writes stored on one brick with replication off,
//! measured in one run on the same machine. Usage: bench-bricks [CHUNKS_PER_SIZE]

use futures::stream::{self, StreamExt};
use mortar_tests::mortar_proto::tls::Role;
use mortar_tests::mortar_proto::transport::{client_endpoint, Pool};
use mortar_tests::mortar_proto::wire::{PutChunk, Reply, Request};
use mortar_tests::mortar_proto::ChunkId;
use mortar_tests::Cluster;
use rand::RngCore;
use std::time::{Duration, Instant};

const IN_FLIGHT: usize = 8;

fn chunks(n: usize, size: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let mut c = vec![0u8; size];
            rng.fill_bytes(&mut c);
            c
        })
        .collect()
}

struct Figure {
    secs: f64,
    count: usize,
    bytes: usize,
}

impl Figure {
    fn per_sec(&self) -> f64 {
        self.count as f64 / self.secs
    }
    fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.secs
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let per_size: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let c = Cluster::start(3);
    let vol = c.create_volume("bench", 1 << 20).await;
    let brick_id = c.certs.identity(Role::Brick, "bench-brick");
    let raw = Pool::new(client_endpoint(&brick_id).expect("endpoint"));
    let target = c.addrs()[0].clone();

    println!(
        "brick write path, {per_size} chunks per size, {IN_FLIGHT} in flight, 3 bricks on loopback"
    );
    println!(
        "{:<10} {:>16} {:>12} {:>16} {:>12} {:>8}",
        "chunk", "replicated/s", "MiB/s", "single brick/s", "MiB/s", "ratio"
    );
    for size in [64 * 1024, 1 << 20] {
        let data = chunks(per_size, size);
        let start = Instant::now();
        stream::iter(data)
            .map(|d| vol.put_chunk(d, false))
            .buffer_unordered(IN_FLIGHT)
            .for_each(|r| async move {
                r.expect("replicated put");
            })
            .await;
        let replicated = Figure {
            secs: start.elapsed().as_secs_f64(),
            count: per_size,
            bytes: per_size * size,
        };

        let data = chunks(per_size, size);
        let start = Instant::now();
        stream::iter(data)
            .map(|d| {
                let req = Request::PutChunk(PutChunk {
                    id: ChunkId::of(&d),
                    data: d,
                    replicate: false,
                    sync: false,
                });
                let (raw, target) = (&raw, &target);
                async move {
                    match raw.call(target, &req, Duration::from_secs(30)).await {
                        Ok(Ok(Reply::ChunkStored { .. })) => {}
                        other => panic!("single-brick put failed: {other:?}"),
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .for_each(|_| async {})
            .await;
        let single = Figure {
            secs: start.elapsed().as_secs_f64(),
            count: per_size,
            bytes: per_size * size,
        };
        println!(
            "{:<10} {:>16.0} {:>12.1} {:>16.0} {:>12.1} {:>8.2}",
            format!("{} KiB", size / 1024),
            replicated.per_sec(),
            replicated.mib_per_sec(),
            single.per_sec(),
            single.mib_per_sec(),
            replicated.per_sec() / single.per_sec()
        );
    }
}
