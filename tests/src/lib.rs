//! Harness for end-to-end tests: a CA and certificates, real `mortar-brick` processes on a
//! loopback address of their own, the `mortar` CLI, and polling with deadlines.
//!
//! Every cluster lives in its own temporary directory and on its own 127.x.y.z address, so
//! tests run in parallel without sharing ports. Processes are killed when the cluster drops,
//! even when the test fails; on failure the tail of each brick's log is printed.

pub mod metrics;
pub mod tree;
pub mod web;
pub mod workload;

use mortar_client::mortar_proto::tls::{self, Identity, Role, Validity};
use mortar_client::mortar_proto::transport::Health;
use mortar_client::Volume;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use mortar_client;
pub use mortar_client::mortar_proto;

/// Generous: CI shares two cores between many processes.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Directory holding the workspace's binaries (the test executable lives in its deps/).
/// The repository's root, where `scripts/` and `docs/` are.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("MORTAR_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in the profile's deps/, benchmark binaries beside the bricks.
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable dir");
    if dir.join("mortar-brick").exists() {
        return dir.to_path_buf();
    }
    dir.parent().expect("target profile dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: build the binaries first (cargo build --workspace --bins; scripts/test.sh does)", p.display());
    p
}

/// Poll `check` until it returns Some or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A distinct loopback address for each cluster in this test process and across processes.
fn unique_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!(
        "127.{}.{}.{}",
        10 + pid % 200,
        (pid / 200) % 250,
        1 + n % 250
    )
}

pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn new(dir: &Path) -> Certs {
        tls::ca_init(dir, "test CA").expect("CA");
        Certs {
            dir: dir.to_path_buf(),
        }
    }
    pub fn ca(&self) -> PathBuf {
        tls::ca_cert_path(&self.dir)
    }
    /// Issue (once) and return (cert, key) for `name`.
    pub fn issue(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        if !cert.exists() {
            tls::issue(&self.dir, role, name, Validity { days: 30 }, &self.dir).expect("issue");
        }
        (cert, key)
    }
    pub fn identity(&self, role: Role, name: &str) -> Identity {
        let (c, k) = self.issue(role, name);
        Identity::load(&c, &k, &self.ca()).expect("identity")
    }
}

pub struct BrickProc {
    pub index: usize,
    pub addr: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Extra command-line arguments for `mortar-brick`.
    pub extra_args: Vec<String>,
    /// Extra environment variables for `mortar-brick` (test hooks).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl BrickProc {
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "brick {} already running", self.index);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin("mortar-brick"))
            .args([
                "--data",
                self.data.to_str().unwrap(),
                "--listen",
                &self.addr,
            ])
            .args([
                "--cert",
                self.cert.to_str().unwrap(),
                "--key",
                self.key.to_str().unwrap(),
            ])
            .args(["--ca", self.ca.to_str().unwrap()])
            .args(&self.extra_args)
            // Its own log file (panics still reach it on stderr), unless the test names one.
            .args(
                (!self.extra_args.iter().any(|a| a == "--log-file"))
                    .then(|| ["--log-file", self.log.to_str().unwrap()])
                    .into_iter()
                    .flatten(),
            )
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn mortar-brick");
        self.child = Some(child);
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = c.try_wait().expect("wait") {
                    assert!(
                        status.success(),
                        "brick {} exited with {status} after SIGTERM",
                        self.index
                    );
                    return;
                }
                if Instant::now() > end {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("brick {} did not stop within 30 s of SIGTERM", self.index);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("brick running").id();
        // SAFETY: a plain kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(pid as i32, sig) },
            0,
            "kill({pid}, {sig})"
        );
    }

    /// SIGSTOP: the process hangs (a frozen host) without closing anything.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGHUP, as logrotate sends after moving the log away.
    pub fn hangup(&self) {
        self.signal(libc::SIGHUP);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit status, once the brick has ended by itself (it can then be started again).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("wait")?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }
}

/// A CLI run: exit code and stdout followed by stderr.
pub struct Run {
    pub code: i32,
    pub out: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub certs: Certs,
    pub ip: String,
    pub bricks: Vec<BrickProc>,
}

impl Cluster {
    /// Start `n` bricks (not yet in a volume).
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// Start `n` bricks with extra `mortar-brick` arguments.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        Self::start_on(n, extra, |_| None)
    }

    /// Start `n` bricks with extra arguments, brick `i` storing into `data(i)` when that is
    /// Some (a test's own filesystem) and into the cluster's directory otherwise.
    pub fn start_on(n: usize, extra: &[&str], data: impl Fn(usize) -> Option<PathBuf>) -> Cluster {
        Self::start_full(n, extra, &[], data)
    }

    /// Start `n` bricks with the environment variables `env` set (test hooks).
    pub fn start_with_env(n: usize, env: &[(&str, &str)]) -> Cluster {
        Self::start_full(n, &[], env, |_| None)
    }

    /// Start `n` bricks with extra arguments, environment variables and data directories.
    pub fn start_full(
        n: usize,
        extra: &[&str],
        env: &[(&str, &str)],
        data: impl Fn(usize) -> Option<PathBuf>,
    ) -> Cluster {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_each(n, |_, _| extra.clone(), env, data)
    }

    /// Start `n` bricks, brick `i` with the extra arguments `extra(i, cluster's IP)`.
    pub fn start_each(
        n: usize,
        extra: impl Fn(usize, &str) -> Vec<String>,
        env: &[(&str, &str)],
        data: impl Fn(usize) -> Option<PathBuf>,
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("mortar-test-")
            .tempdir()
            .expect("tempdir");
        let certs = Certs::new(&dir.path().join("pki"));
        let ip = unique_ip();
        let mut bricks = Vec::new();
        for i in 0..n {
            let (cert, key) = certs.issue(Role::Brick, &format!("brick{i}"));
            let mut b = BrickProc {
                index: i,
                addr: format!("{ip}:{}", 7001 + i),
                data: data(i).unwrap_or_else(|| dir.path().join(format!("brick{i}"))),
                log: dir.path().join(format!("brick{i}.log")),
                cert,
                key,
                ca: certs.ca(),
                extra_args: extra(i, &ip),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                child: None,
            };
            b.start();
            bricks.push(b);
        }
        Cluster {
            dir,
            certs,
            ip,
            bricks,
        }
    }

    /// Start one more brick (not in the volume), with brick 0's extra arguments; its index.
    pub fn add_brick(&mut self) -> usize {
        let i = self.bricks.len();
        let (cert, key) = self.certs.issue(Role::Brick, &format!("brick{i}"));
        let mut b = BrickProc {
            index: i,
            addr: format!("{}:{}", self.ip, 7001 + i),
            data: self.dir.path().join(format!("brick{i}")),
            log: self.dir.path().join(format!("brick{i}.log")),
            cert,
            key,
            ca: self.certs.ca(),
            extra_args: self.bricks[0].extra_args.clone(),
            env: Vec::new(),
            child: None,
        };
        b.start();
        self.bricks.push(b);
        i
    }

    pub fn addrs(&self) -> Vec<String> {
        self.bricks.iter().map(|b| b.addr.clone()).collect()
    }

    /// Run the `mortar` CLI with the admin certificate.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run mortar")
    }

    /// The `mortar` CLI with the admin certificate, to spawn (for a run to kill).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let (cert, key) = self.certs.issue(Role::Admin, "admin");
        let mut c = Command::new(bin("mortar"));
        c.args(args)
            .env("MORTAR_CERT", cert)
            .env("MORTAR_KEY", key)
            .env("MORTAR_CA", self.certs.ca())
            .stdin(Stdio::null());
        c
    }

    /// `mortar volume CMD www ARGS --bricks <all>` with the admin certificate, printed.
    pub fn volume_cli(&self, cmd: &str, args: &[&str]) -> Run {
        self.group_cli("volume", cmd, "www", args)
    }

    /// `mortar snapshot CMD www ARGS --bricks <all>` with the admin certificate, printed.
    pub fn snapshot_cli(&self, cmd: &str, args: &[&str]) -> Run {
        self.group_cli("snapshot", cmd, "www", args)
    }

    /// `mortar GROUP CMD VOLUME ARGS --bricks <all>` with the admin certificate, printed.
    pub fn group_cli(&self, group: &str, cmd: &str, volume: &str, args: &[&str]) -> Run {
        let bricks = self.addrs().join(",");
        let mut all = vec![group, cmd, volume];
        all.extend(args);
        all.extend(["--bricks", &bricks]);
        let o = self.cli(&all);
        let run = Run {
            code: o.status.code().unwrap_or(-1),
            out: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        };
        eprintln!(
            "$ mortar {group} {cmd} {volume} {}\n{}",
            args.join(" "),
            run.out
        );
        run
    }

    /// `mortar volume create NAME replica 3 ...` over all bricks, waiting for them to listen.
    pub async fn create_volume(&self, name: &str, chunk_size: u32) -> Volume {
        let admin = self.admin_pool();
        for a in self.addrs() {
            wait_for(&format!("brick {a} to answer"), DEADLINE, || {
                let admin = admin.clone();
                let a = a.clone();
                async move { mortar_client::volume_admin::hello(&admin, &a).await.ok() }
            })
            .await;
        }
        let mut args = vec!["volume", "create", name, "replica", "3"];
        let addrs = self.addrs();
        args.extend(addrs.iter().map(String::as_str));
        let cs = chunk_size.to_string();
        args.extend(["--chunk-size", &cs]);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "volume create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.client(name).await
    }

    pub async fn client(&self, volume: &str) -> Volume {
        let id = self.certs.identity(Role::Client, "client");
        Volume::connect(&self.addrs(), volume, &id)
            .await
            .expect("connect to volume")
    }

    pub fn admin_pool(&self) -> mortar_proto::transport::Pool {
        let id = self.certs.identity(Role::Admin, "admin");
        mortar_proto::transport::Pool::new(
            mortar_proto::transport::client_endpoint(&id).expect("endpoint"),
        )
    }

    /// The index of the brick that is the metadata leader (waits for an election).
    pub async fn leader_index(&self) -> usize {
        let pool = self.admin_pool();
        wait_for("a metadata leader", DEADLINE, || {
            let pool = pool.clone();
            let addrs = self.addrs();
            async move {
                for (i, a) in addrs.iter().enumerate() {
                    if let Ok(s) = mortar_client::volume_admin::status(&pool, a).await {
                        if s.raft_role == "leader" {
                            return Some(i);
                        }
                    }
                }
                None
            }
        })
        .await
    }

    /// Each brick's status (None for a brick that does not answer).
    pub async fn statuses(&self) -> Vec<Option<mortar_proto::wire::BrickStatus>> {
        let pool = self.admin_pool();
        let mut out = Vec::new();
        for a in self.addrs() {
            out.push(mortar_client::volume_admin::status(&pool, &a).await.ok());
        }
        out
    }

    /// Every brick's namespace digest, once all report the same applied index.
    pub async fn settled_meta_digests(&self) -> Vec<[u8; 32]> {
        self.settled_meta_digests_of(&self.addrs()).await
    }

    /// [`Cluster::settled_meta_digests`] of the bricks at `addrs`.
    pub async fn settled_meta_digests_of(&self, addrs: &[String]) -> Vec<[u8; 32]> {
        let pool = self.admin_pool();
        let addrs = addrs.to_vec();
        wait_for("all bricks to apply the same log index", DEADLINE, || {
            let (pool, addrs) = (pool.clone(), addrs.clone());
            async move {
                let mut seen = Vec::new();
                for a in &addrs {
                    match mortar_client::volume_admin::meta_digest(&pool, a).await {
                        Ok(d) => seen.push(d),
                        Err(e) => {
                            eprintln!("digest of {a}: {e}");
                            return None;
                        }
                    }
                }
                eprintln!(
                    "applied indexes: {:?}",
                    seen.iter().map(|(i, _)| *i).collect::<Vec<_>>()
                );
                seen.iter()
                    .all(|(i, _)| *i == seen[0].0)
                    .then(|| seen.into_iter().map(|(_, d)| d).collect())
            }
        })
        .await
    }

    /// SIGTERM every brick, then start them all again (a full volume restart).
    pub fn restart_all(&mut self) {
        for b in &mut self.bricks {
            b.stop();
        }
        for b in &mut self.bricks {
            b.start();
        }
    }

    /// Every chunk id each brick holds, through the admin API.
    pub async fn chunks_per_brick(&self) -> Vec<std::collections::BTreeSet<mortar_proto::ChunkId>> {
        let pool = self.admin_pool();
        let mut out = Vec::new();
        for a in self.addrs() {
            out.push(
                mortar_client::volume_admin::list_chunks(&pool, &a)
                    .await
                    .expect("list a brick's chunks")
                    .into_iter()
                    .collect(),
            );
        }
        out
    }

    /// Stop brick `i`, change its store directly (rot or drop a chunk), and start it again.
    pub async fn tamper(&mut self, i: usize, change: impl FnOnce(&mortar_brick::store::Store)) {
        self.bricks[i].stop();
        {
            let store = mortar_brick::store::Store::open(&self.bricks[i].data)
                .expect("open the stopped brick's store");
            change(&store);
        }
        self.bricks[i].start();
        self.wait_up(i).await;
    }

    /// Wait until brick `i` answers.
    pub async fn wait_up(&self, i: usize) {
        let pool = self.admin_pool();
        let addr = self.addrs()[i].clone();
        wait_for(&format!("brick {addr} to answer"), DEADLINE, || {
            let (pool, addr) = (pool.clone(), addr.clone());
            async move { mortar_client::volume_admin::status(&pool, &addr).await.ok() }
        })
        .await;
    }

    /// Wait until the volume has all its redundancy back: every brick answers, reaches every
    /// other brick (as its `status` reports), and has applied the metadata log as far as any
    /// brick had when the wait began. Returns how long that took.
    pub async fn wait_recovered(&self) -> Duration {
        let pool = self.admin_pool();
        let since = Instant::now();
        let mut target = 0;
        let mut missing = Vec::new();
        while since.elapsed() < DEADLINE {
            missing.clear();
            let mut applied = Vec::new();
            for a in self.addrs() {
                match mortar_client::volume_admin::status(&pool, &a).await {
                    Ok(s) => {
                        missing.extend(
                            s.peers
                                .iter()
                                .filter(|p| p.health != Health::Up)
                                .map(|p| format!("{a} sees {} {}", p.addr, p.health)),
                        );
                        applied.push(s.applied_index);
                    }
                    Err(e) => missing.push(format!("{a}: {e}")),
                }
            }
            if target == 0 && missing.is_empty() {
                target = applied.iter().copied().max().unwrap_or(0);
            }
            missing.extend(
                applied
                    .iter()
                    .filter(|&&i| i < target)
                    .map(|i| format!("a brick has applied {i} of {target}")),
            );
            if missing.is_empty() {
                return since.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("after {DEADLINE:?} the volume has not recovered: {missing:?}");
    }

    pub fn log_contains(&self, index: usize, needle: &str) -> bool {
        std::fs::read_to_string(&self.bricks[index].log)
            .unwrap_or_default()
            .contains(needle)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for b in &mut self.bricks {
            if b.child.is_some() {
                b.thaw();
            }
            b.kill();
        }
        if std::env::var_os("MORTAR_KEEP_TEST_DIR").is_some() {
            let kept =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("kept test directory {}", kept.display());
        }
        if std::thread::panicking() {
            for b in &self.bricks {
                let log = std::fs::read_to_string(&b.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- brick{} log tail ({}) ----", b.index, b.log.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// A network fault: UDP packets matching its iptables rules are dropped until it is dropped
/// (the rules are removed then, also when a test fails).
pub struct NetCut {
    rules: Vec<Vec<String>>,
}

fn host_port(addr: &str) -> (String, String) {
    let (h, p) = addr.rsplit_once(':').expect("HOST:PORT");
    (h.to_string(), p.to_string())
}

impl NetCut {
    fn install(rules: Vec<Vec<String>>) -> NetCut {
        let mut cut = NetCut { rules: Vec::new() };
        for r in rules {
            let out = Command::new("iptables")
                .args(["-I", "INPUT"])
                .args(&r)
                .output()
                .expect("run iptables (installed by scripts/test.sh)");
            assert!(
                out.status.success(),
                "iptables -I INPUT {}: {}",
                r.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            cut.rules.push(r);
        }
        cut
    }

    fn rule(src: Option<&str>, dst: Option<&str>) -> Vec<String> {
        let mut r = vec!["-p".to_string(), "udp".to_string()];
        if let Some(a) = src {
            let (h, p) = host_port(a);
            r.extend(["-s".into(), h, "--sport".into(), p]);
        }
        if let Some(a) = dst {
            let (h, p) = host_port(a);
            r.extend(["-d".into(), h, "--dport".into(), p]);
        }
        r.extend(["-j".into(), "DROP".into()]);
        r
    }

    /// Cut `addr` (a brick) off from everyone: clients and the other bricks.
    pub fn isolate(addr: &str) -> NetCut {
        Self::install(vec![
            Self::rule(Some(addr), None),
            Self::rule(None, Some(addr)),
        ])
    }

    /// Cut every address in `a` off from every address in `b`, both ways; each side still
    /// reaches its own members.
    pub fn between(a: &[&str], b: &[String]) -> NetCut {
        let mut rules = Vec::new();
        for x in a {
            for y in b {
                rules.push(Self::rule(Some(x), Some(y)));
                rules.push(Self::rule(Some(y), Some(x)));
            }
        }
        Self::install(rules)
    }
}

impl Drop for NetCut {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = Command::new("iptables")
                .args(["-D", "INPUT"])
                .args(r)
                .status();
        }
    }
}

/// True when `path` is a mount point (per /proc/self/mounts).
pub fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(p.as_str()))
}

/// A `mortar-mount -f` child process with its mount point. Dropping it unmounts (lazily, so a
/// failed test never leaves a busy mount) and stops the process.
pub struct Mount {
    pub path: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// A mount made by a daemonising `mount.mortar` (no child of ours): dropping it unmounts.
    pub fn daemonised(path: PathBuf, log: PathBuf) -> Mount {
        Mount {
            path,
            log,
            child: None,
        }
    }

    /// SIGHUP, as logrotate sends after moving the log away.
    pub fn hangup(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
        }
    }

    /// SIGSTOP the mount process (a frozen app server); nothing may touch its mount meanwhile.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
        }
    }

    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
    }

    pub fn unmount(&mut self) {
        self.thaw();
        if is_mounted(&self.path) {
            let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if let Some(mut c) = self.child.take() {
            let end = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- mount log tail ({}) ----", self.log.display());
            for l in log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("{l}");
            }
        }
    }
}

impl Cluster {
    /// `-o` options that point a mount at this cluster's client certificate.
    pub fn mount_options(&self, name: &str) -> String {
        let (cert, key) = self.certs.issue(Role::Client, "client");
        format!(
            "cert={},key={},ca={},log={}",
            cert.display(),
            key.display(),
            self.certs.ca().display(),
            self.dir.path().join(format!("{name}.log")).display()
        )
    }

    pub fn source(&self, volume: &str) -> String {
        format!("{}:/{volume}", self.addrs().join(","))
    }

    /// Mount `volume` in the foreground at a fresh directory and wait until it is live.
    pub async fn mount(&self, volume: &str, name: &str, extra: &str) -> Mount {
        self.mount_with_env(volume, name, extra, &[]).await
    }

    /// [`Cluster::mount`] with extra environment variables for `mortar-mount` (test hooks).
    pub async fn mount_with_env(
        &self,
        volume: &str,
        name: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Mount {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        let mut opts = self.mount_options(name);
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        let child = Command::new(bin("mortar-mount"))
            .arg(self.source(volume))
            .arg(&path)
            .args(["-f", "-o", &opts])
            // Delegation grants and give-backs are logged, so tests can tell the path was taken.
            .env("MORTAR_LOG", "info,mortar_client::delegation=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mortar-mount");
        let mut m = Mount {
            path: path.clone(),
            log: self.dir.path().join(format!("{name}.log")),
            child: Some(child),
        };
        let p = path.clone();
        wait_for(
            &format!("{} to be mounted", path.display()),
            DEADLINE,
            || {
                let mounted = is_mounted(&p);
                async move { mounted.then_some(()) }
            },
        )
        .await;
        assert!(
            m.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "mortar-mount exited"
        );
        m
    }
}
