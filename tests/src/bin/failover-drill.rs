//! The failover drill: a live workload on a mount — a writer that writes and fsyncs a small
//! file every 10 ms and reads it back, and nginx serving a file from the mount under wrk —
//! while each brick in turn (the metadata leader first) is killed, frozen and cut off the
//! network. Prints per fault the longest stall the application saw, its failed operations,
//! nginx's errors and slowest response, and whether every acknowledged write is still there.
//! Usage: failover-drill [HOLD_SECS]   (run by scripts/failover-drill.sh)

use mortar_tests::workload::{Fault, Writer};
use mortar_tests::{wait_for, Cluster, DEADLINE};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Seconds since midnight UTC of a brick log line's timestamp (`2026-12-03T15:52:30.614099Z …`).
fn log_time(line: &str) -> Option<f64> {
    let t = line
        .split_whitespace()
        .next()?
        .split('T')
        .nth(1)?
        .trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

fn seconds_of_day(t: SystemTime) -> f64 {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (since.as_secs_f64()) % 86_400.0
}

/// Where a leader fault's stall went, read from the surviving bricks' logs: the first pre-vote
/// won and the first brick leading after the fault, in seconds after it. (A run across
/// midnight UTC reads nothing.)
fn election_after(c: &Cluster, victim: usize, fault_at: SystemTime) -> (Option<f64>, Option<f64>) {
    let from = seconds_of_day(fault_at);
    let first = |needle: &str| {
        (0..c.bricks.len())
            .filter(|&i| i != victim)
            .filter_map(|i| std::fs::read_to_string(&c.bricks[i].log).ok())
            .flat_map(|text| {
                text.lines()
                    .filter(|l| l.contains(needle))
                    .filter_map(log_time)
                    .filter(|t| *t >= from)
                    .collect::<Vec<_>>()
            })
            .map(|t| t - from)
            .reduce(f64::min)
    };
    (
        first("pre-vote won: standing for election"),
        first("state=Leader"),
    )
}

/// What wrk saw over one fault.
struct Http {
    requests: u64,
    errors: u64,
    slowest: String,
}

fn parse_wrk(out: &str) -> Http {
    let mut h = Http {
        requests: 0,
        errors: 0,
        slowest: "-".into(),
    };
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", _avg, _stdev, max, ..] => h.slowest = max.to_string(),
            [n, "requests", "in", ..] => h.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => h.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                h.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    h
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let hold = Duration::from_secs(
        std::env::args()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(60),
    );
    let mut c = Cluster::start(3);
    c.create_volume("www", 1 << 20).await;
    let m = c.mount("www", "mnt", "").await;
    std::fs::create_dir_all(m.path.join("static")).expect("mkdir on the mount");
    let page: Vec<u8> = (0..20_000u32)
        .map(|i| b"<p>mortar</p>\n"[(i % 14) as usize])
        .collect();
    std::fs::write(m.path.join("static/page.html"), &page).expect("write the page");

    let http_addr = format!("{}:8080", c.ip);
    let conf = c.dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root; master_process off; worker_processes 1; pid {dir}/nginx.pid; \
             error_log {dir}/nginx.err; events {{ worker_connections 256; }} \
             http {{ access_log off; server {{ listen {http_addr}; root {root}; }} }}",
            dir = c.dir.path().display(),
            root = m.path.display()
        ),
    )
    .expect("nginx config");
    let mut nginx = Command::new("nginx")
        .args(["-c", conf.to_str().unwrap(), "-g", "daemon off;"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start nginx (installed by scripts/failover-drill.sh)");
    let url = format!("http://{http_addr}/static/page.html");
    wait_for("nginx to serve", DEADLINE, || {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &url])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        async move { ok.then_some(()) }
    })
    .await;

    let w = Writer::start(&m.path.join("app"));
    w.progresses("the writer to make progress").await;
    println!(
        "failover drill, {}, {} cores; three bricks, the mount, nginx and wrk on this machine; each fault held {hold:?}",
        chrono_date(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "{:<8} {:<14} {:>9} {:>7} {:>14} {:>10} {:>8} {:>12} {:>14}",
        "fault",
        "brick",
        "writes",
        "failed",
        "longest stall",
        "http reqs",
        "http err",
        "http slowest",
        "acked present"
    );
    let mut all_good = true;
    // Each kind of fault hits every brick, the current metadata leader first.
    for fault in Fault::ALL {
        let first = c.leader_index().await;
        for victim in (0..3).map(|k| (first + k) % 3) {
            let leader = c.leader_index().await;
            let wrk_secs = hold.as_secs() + 8;
            let wrk = Command::new("wrk")
                .args([
                    "-t1",
                    "-c8",
                    &format!("-d{wrk_secs}s"),
                    "--latency",
                    "--timeout",
                    "10s",
                ])
                .arg(&url)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start wrk");
            let from = Instant::now();
            let fault_at = SystemTime::now();
            fault.inject(&mut c, victim, hold).await;
            w.progresses("the writer to make progress").await;
            let out = tokio::task::spawn_blocking(move || wrk.wait_with_output())
                .await
                .expect("join")
                .expect("wrk");
            let http = parse_wrk(&String::from_utf8_lossy(&out.stdout));
            let (window, lost) = {
                let log = w.log.lock().expect("log");
                (log.window(from, Instant::now()), log.lost())
            };
            all_good &= window.failed.is_empty() && lost.is_empty() && http.errors == 0;
            println!(
                "{:<8} {:<14} {:>9} {:>7} {:>13.2}s {:>10} {:>8} {:>12} {:>14}",
                format!("{fault:?}").to_lowercase(),
                format!(
                    "{}{}",
                    victim,
                    if victim == leader { " (leader)" } else { "" }
                ),
                window.ops,
                window.failed.len(),
                window.longest.as_secs_f64(),
                http.requests,
                http.errors,
                http.slowest,
                if lost.is_empty() {
                    "yes".to_string()
                } else {
                    format!("NO ({} lost)", lost.len())
                }
            );
            if victim == leader {
                let (pre_vote, elected) = election_after(&c, victim, fault_at);
                let stalled_from = {
                    let log = w.log.lock().expect("log");
                    log.ops
                        .iter()
                        .filter(|o| o.start + o.took >= from)
                        .max_by_key(|o| o.took)
                        .map(|o| o.start.saturating_duration_since(from).as_secs_f64())
                };
                let s = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.3}s"));
                println!(
                    "    timeline after the fault: pre-vote won {}, new leader {}, longest write began {} and took {:.3}s",
                    s(pre_vote),
                    s(elected),
                    s(stalled_from),
                    window.longest.as_secs_f64()
                );
            }
            for f in window.failed.iter().take(3) {
                println!("    failed: {f}");
            }
        }
    }
    let log = w.finish();
    let _ = nginx.kill();
    let _ = nginx.wait();
    let lost = log.lost();
    println!(
        "total: {} writes acknowledged, {} lost; {}",
        log.acked.len(),
        lost.len(),
        if all_good && lost.is_empty() {
            "PASS"
        } else {
            "FAIL"
        }
    );
    drop(m);
    if !(all_good && lost.is_empty()) {
        std::process::exit(1);
    }
}

fn chrono_date() -> String {
    Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
