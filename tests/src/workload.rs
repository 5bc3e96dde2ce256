//! The application side of fault tests and the failover drill: a writer that creates, writes
//! and fsyncs a small file every 10 ms on a mount and reads it back, recording every
//! operation's start, duration and outcome, and every acknowledged write.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Op {
    pub start: Instant,
    pub took: Duration,
    pub error: Option<String>,
}

#[derive(Default, Debug)]
pub struct Log {
    pub ops: Vec<Op>,
    /// Files whose write and fsync succeeded, with their contents.
    pub acked: Vec<(PathBuf, Vec<u8>)>,
}

/// Figures for the operations of a time window.
#[derive(Debug, Default)]
pub struct Window {
    pub ops: usize,
    pub failed: Vec<String>,
    pub longest: Duration,
}

impl Log {
    /// Operations in flight at any time between `from` and `to` (one started just before a
    /// fault and stalled by it counts).
    pub fn window(&self, from: Instant, to: Instant) -> Window {
        let mut w = Window::default();
        for op in self
            .ops
            .iter()
            .filter(|o| o.start + o.took >= from && o.start <= to)
        {
            w.ops += 1;
            w.longest = w.longest.max(op.took);
            if let Some(e) = &op.error {
                w.failed.push(e.clone());
            }
        }
        w
    }

    /// Acknowledged writes that are missing or different now.
    pub fn lost(&self) -> Vec<String> {
        self.lost_through(Path::new("/"), Path::new("/"))
    }

    /// Acknowledged writes made under `written` that are missing or different when read under
    /// `read` instead: another mount of the same volume, so what the writer's own cache holds
    /// cannot stand in for what the bricks hold.
    pub fn lost_through(&self, written: &Path, read: &Path) -> Vec<String> {
        self.acked
            .iter()
            .filter(|(p, body)| {
                let rel = p.strip_prefix(written).expect("written under the mount");
                std::fs::read(read.join(rel)).ok().as_ref() != Some(body)
            })
            .map(|(p, _)| p.display().to_string())
            .collect()
    }
}

pub struct Writer {
    stop: Arc<AtomicBool>,
    pub log: Arc<Mutex<Log>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(dir: &Path) -> Writer {
        std::fs::create_dir_all(dir).expect("workload directory");
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Log::default()));
        let (s, l, dir) = (stop.clone(), log.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let path = dir.join(format!("w{n}"));
                let body = format!("write {n} {}", "x".repeat((n % 200) as usize)).into_bytes();
                let start = Instant::now();
                let result = write_and_read_back(&path, &body);
                let took = start.elapsed();
                let mut log = l.lock().expect("log lock");
                log.ops.push(Op {
                    start,
                    took,
                    error: result
                        .as_ref()
                        .err()
                        .map(|e| format!("{}: {e}", path.display())),
                });
                if result.is_ok() {
                    log.acked.push((path, body));
                }
                drop(log);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Writer {
            stop,
            log,
            thread: Some(thread),
        }
    }

    pub fn ops(&self) -> usize {
        self.log.lock().expect("log lock").ops.len()
    }

    /// Wait until the writer has done 20 more operations.
    pub async fn progresses(&self, what: &str) {
        let from = self.ops();
        crate::wait_for(what, crate::DEADLINE, || {
            let done = self.ops() >= from + 20;
            async move { done.then_some(()) }
        })
        .await;
    }

    pub fn finish(mut self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.log.lock().expect("log lock"))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn write_and_read_back(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(body)?;
    f.sync_all()?;
    drop(f);
    let mut back = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut back)?;
    if back != body {
        return Err(std::io::Error::other("read back different bytes"));
    }
    Ok(())
}

/// The faults the failover tests and drill inject into one brick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, restarted after the hold.
    Kill,
    /// SIGSTOP for the hold, then SIGCONT: a hung host.
    Freeze,
    /// Every packet to and from the brick dropped for the hold (iptables).
    Cut,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::Kill, Fault::Freeze, Fault::Cut];

    /// Apply the fault to brick `victim`, hold it, undo it, and wait until the volume has
    /// recovered (the next fault must not meet a volume still short of a replica: that would be
    /// two faults at once).
    pub async fn inject(self, c: &mut crate::Cluster, victim: usize, hold: Duration) {
        match self {
            Fault::Kill => {
                c.bricks[victim].kill();
                tokio::time::sleep(hold).await;
                c.bricks[victim].start();
            }
            Fault::Freeze => {
                c.bricks[victim].freeze();
                tokio::time::sleep(hold).await;
                c.bricks[victim].thaw();
            }
            Fault::Cut => {
                let cut = crate::NetCut::isolate(&c.addrs()[victim]);
                tokio::time::sleep(hold).await;
                drop(cut);
            }
        }
        let took = c.wait_recovered().await;
        eprintln!("{self:?} of brick {victim} undone; volume recovered after {took:?}");
    }
}
