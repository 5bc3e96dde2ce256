//! Issue "Mount a volume as a web document root": the mount as an operator and a web server
//! use it — nginx serving from it, `mount -t mortar`, bad input at mount time, the quickstart.

use mortar_tests::mortar_proto::tls::Role;
use mortar_tests::web::{http_get, Nginx};
use mortar_tests::{bin, is_mounted, Cluster, Mount};
use std::path::Path;
use std::process::{Command, Stdio};

/// Acceptance 4: nginx on loopback serves files from the mount byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_the_mount_byte_for_byte() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let m = cl.mount("www", "docroot", "").await;
    let mut files = Vec::new();
    std::fs::create_dir_all(m.path.join("assets/img")).unwrap();
    for (i, size) in [0usize, 1, 700, 16_385, 1_048_576, 3_333_333]
        .iter()
        .enumerate()
    {
        let body: Vec<u8> = (0..*size).map(|k| (k * 7 + i) as u8).collect();
        let rel = if i % 2 == 0 {
            format!("/page{i}.html")
        } else {
            format!("/assets/img/f{i}.bin")
        };
        std::fs::write(m.path.join(&rel[1..]), &body).unwrap();
        files.push((rel, body));
    }

    let port = 18_080;
    let listen = format!("{}:{port}", cl.ip);
    let _nginx = Nginx::start(cl.dir.path(), &listen, &m.path).await;
    let results = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|(rel, body)| (rel.clone(), body, http_get(&listen, &rel)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (rel, body, (status, got)) in results {
        assert_eq!(status, 200, "{rel}");
        assert!(
            got == body,
            "{rel}: {} bytes served, {} expected",
            got.len(),
            body.len()
        );
    }
}

fn run_mount(args: &[&str]) -> std::process::Output {
    Command::new(bin("mortar-mount"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mortar-mount")
}

fn assert_refused(out: &std::process::Output, needle: &str, mountpoint: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "mount succeeded; expected '{needle}'"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "not a one-line error: {err}"
    );
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(
        !is_mounted(mountpoint),
        "a failed mount left {} mounted",
        mountpoint.display()
    );
}

/// Acceptance 5: bad input at mount time gives a one-line error, a non-zero exit, no mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_refuses_bad_input_cleanly() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let mnt = cl.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ms = mnt.to_str().unwrap();
    let opts = cl.mount_options("bad");

    let out = run_mount(&[&cl.source("nope"), ms, "-o", &opts]);
    assert_refused(&out, "volume 'nope' not found", &mnt);

    let dead = format!("{0}:9,{0}:10:/www", cl.ip);
    let out = run_mount(&[&dead, ms, "-o", &format!("{opts},connect_timeout=3")]);
    assert_refused(&out, "cannot reach volume 'www'", &mnt);

    let other = tempfile::tempdir().unwrap();
    let foreign = mortar_tests::Certs::new(other.path());
    let (cert, key) = foreign.issue(Role::Client, "intruder");
    let wrong = format!(
        "cert={},key={},ca={}",
        cert.display(),
        key.display(),
        cl.certs.ca().display()
    );
    let out = run_mount(&[&cl.source("www"), ms, "-o", &wrong]);
    assert_refused(&out, "refused our certificate", &mnt);

    let out = run_mount(&[&cl.source("www"), ms, "-o", &format!("{opts},frobnicate")]);
    assert_refused(&out, "unknown mount option 'frobnicate'", &mnt);

    let missing = cl.dir.path().join("missing");
    let out = run_mount(&[&cl.source("www"), missing.to_str().unwrap(), "-o", &opts]);
    assert_refused(&out, "does not exist", &missing);

    std::fs::write(mnt.join("stray"), b"x").unwrap();
    let out = run_mount(&[&cl.source("www"), ms, "-o", &opts]);
    assert_refused(&out, "is not empty", &mnt);
    std::fs::remove_file(mnt.join("stray")).unwrap();

    let out = run_mount(&["not-a-source", ms]);
    assert_refused(&out, "bad source", &mnt);
}

/// `mount -t mortar` through the mount.mortar helper, daemonised, and `umount`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_helper_daemonises_and_umount_works() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let helper_dir = cl.dir.path().join("sbin");
    std::fs::create_dir(&helper_dir).unwrap();
    std::os::unix::fs::symlink(bin("mortar-mount"), helper_dir.join("mount.mortar")).unwrap();
    let mnt = cl.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let path = format!(
        "{}:{}",
        helper_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // mount(8) looks for /sbin/mount.TYPE; -i skips it, so call the helper the way mount does.
    let out = Command::new("mount.mortar")
        .env("PATH", &path)
        .args([
            &cl.source("www"),
            mnt.to_str().unwrap(),
            "-o",
            &format!("_netdev,{}", cl.mount_options("helper")),
        ])
        .output()
        .expect("run mount.mortar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt), "returned before the mount was live");
    std::fs::write(mnt.join("hello"), b"world").unwrap();
    assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"world");
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mnt));
}

/// `diff -r` of a tree against its copy, comparing symlinks as links (WordPress has relative
/// ones that dangle at a new location).
fn diff_tree(src: &Path, copy: &Path) -> std::process::Output {
    Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(src)
        .arg(copy)
        .output()
        .unwrap()
}

/// Acceptance 1: the quickstart mounts a volume; a web tree copied in with cp -a diffs clean;
/// stop unmounts and stops; a second run brings the same data back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_round_trip() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("qs");
    let mnt = work.path().join("www");
    let ip = "127.77.77.1";
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let quickstart = |arg: Option<&str>| {
        let mut cmd = Command::new("bash");
        cmd.arg(repo.join("scripts/quickstart.sh"));
        cmd.args(arg);
        cmd.env("MORTAR_QUICKSTART_DIR", &state)
            .env("MORTAR_QUICKSTART_IP", ip)
            .env("MORTAR_QUICKSTART_MNT", &mnt);
        let out = cmd.output().expect("run quickstart");
        assert!(
            out.status.success(),
            "quickstart {arg:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    struct Stop<'a>(&'a dyn Fn(Option<&str>) -> String);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    (self.0)(Some("stop"))
                }));
            }
        }
    }
    let _stop = Stop(&quickstart);
    let out = quickstart(None);
    assert!(out.contains("mounted www at"), "{out}");
    assert!(is_mounted(&mnt));

    let src = Path::new("/usr/share/wordpress");
    assert!(
        src.exists(),
        "the wordpress package is missing: scripts/test.sh installs it"
    );
    let cp = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        cp.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&cp.stderr)
    );
    let diff = diff_tree(src, &mnt.join("wordpress"));
    assert!(
        diff.status.success() && diff.stdout.is_empty(),
        "diff -r: {}",
        String::from_utf8_lossy(&diff.stdout)
    );

    // The web server's user reads every file of the tree (the mount allows other users).
    let docroot = mnt.join("wordpress");
    let listen = format!("{ip}:18081");
    let nginx = Nginx::start(work.path(), &listen, &docroot).await;
    let files = mortar_tests::tree::regular_files(src);
    assert!(
        files.len() > 1000,
        "only {} files in {}",
        files.len(),
        src.display()
    );
    let l = listen.clone();
    let served = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .filter_map(|rel| {
                let url = format!("/{}", rel.display()).replace(' ', "%20");
                let (status, body) = http_get(&l, &url);
                let want = std::fs::read(Path::new("/usr/share/wordpress").join(&rel)).unwrap();
                (status != 200 || body != want).then(|| format!("{url}: {status}"))
            })
            .collect::<Vec<_>>()
    });
    let wrong = served.await.unwrap();
    drop(nginx);
    let total = mortar_tests::tree::walk(src).len();
    assert!(
        wrong.is_empty(),
        "{} of {total} paths served wrong as www-data: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );

    let out = quickstart(Some("stop"));
    assert!(
        out.contains("unmounted") && out.contains("stopped brick3"),
        "{out}"
    );
    assert!(!is_mounted(&mnt));
    let out = quickstart(None);
    assert!(out.contains("volume www exists"), "{out}");
    let diff = diff_tree(src, &mnt.join("wordpress"));
    assert!(
        diff.status.success() && diff.stdout.is_empty(),
        "after restart: {}",
        String::from_utf8_lossy(&diff.stdout)
    );
    quickstart(Some("stop"));
}

/// getattr requests the mount answered while `file` was fstat'ed every 100 ms for 3 s: the
/// kernel asks again each time its attribute timeout runs out.
fn getattrs_while_polling(metrics: &str, file: &std::fs::File) -> f64 {
    let count = || {
        mortar_tests::metrics::sum(
            &mortar_tests::metrics::scrape(metrics),
            "mortar_mount_requests_total",
            "op=\"getattr\"",
        )
    };
    let before = count();
    for _ in 0..30 {
        file.metadata().unwrap();
        // Pacing the probe, not waiting for anything.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    count() - before
}

/// Issue 23, acceptance 3: `volume set` changes what a live mount does, bad keys and values
/// are refused naming what is valid, `volume get all` lists every key, `reset` goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_options_reach_a_live_mount_and_bad_ones_are_refused() {
    let c = Cluster::start(3);
    c.create_volume("www", 1 << 20).await;
    let metrics = format!("{}:9200", c.ip);
    let m = c.mount("www", "m", &format!("metrics={metrics}")).await;
    let log = || std::fs::read_to_string(&m.log).unwrap_or_default();
    std::fs::write(m.path.join("index.html"), b"hello").unwrap();
    let file = std::fs::File::open(m.path.join("index.html")).unwrap();
    let at_default = getattrs_while_polling(&metrics, &file);
    assert!(
        at_default >= 2.0,
        "with the 1 s default the kernel asked only {at_default} times in 3 s"
    );

    let run = c.volume_cli("set", &["cache.attr-timeout", "30"]);
    assert_eq!(run.code, 0, "{}", run.out);
    mortar_tests::wait_for(
        "the mount to apply the option",
        mortar_tests::DEADLINE,
        || {
            let applied = log().contains("kernel attribute and entry timeouts attr=30s");
            async move { applied.then_some(()) }
        },
    )
    .await;
    // The attributes cached before the change expire on the old timeout, and the answer the
    // kernel then gets carries the new one.
    let asked = |file: &std::fs::File| {
        let before = mortar_tests::metrics::scrape(&metrics);
        file.metadata().unwrap();
        let after = mortar_tests::metrics::scrape(&metrics);
        let n = |s| mortar_tests::metrics::sum(s, "mortar_mount_requests_total", "op=\"getattr\"");
        n(&after) > n(&before)
    };
    mortar_tests::wait_for(
        "the kernel to ask once more",
        mortar_tests::DEADLINE,
        || {
            let asked = asked(&file);
            async move { asked.then_some(()) }
        },
    )
    .await;
    let after_set = getattrs_while_polling(&metrics, &file);
    assert_eq!(
        after_set, 0.0,
        "the kernel asked again within the 30 s timeout"
    );

    let info = c.volume_cli("info", &[]);
    assert!(
        info.out
            .contains("Options Reconfigured:\ncache.attr-timeout: 30"),
        "{}",
        info.out
    );
    let get = c.volume_cli("get", &["all"]);
    assert_eq!(get.code, 0);
    for s in mortar_tests::mortar_proto::options::SPECS {
        let line = get
            .out
            .lines()
            .find(|l| l.starts_with(s.key))
            .unwrap_or_else(|| panic!("volume get all does not list {}", s.key));
        let value = c.volume_cli("get", &[s.key]);
        let expect = if s.key == "cache.attr-timeout" {
            "30"
        } else {
            s.default
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&words[1..3], &[expect, s.default], "{line}");
        assert!(value.out.contains(line), "{}", value.out);
    }

    for (args, says) in [
        (&["bogus", "1"][..], "no volume option \"bogus\"; the options are: cache.attr-timeout, cache.entry-timeout, heal.gc-grace"),
        (&["cache.attr-timeout", "-5"][..], "want seconds from 0 to 86400"),
        (&["heal.gc-grace", "soon"][..], "want whole seconds"),
        (&["heal.scrub-rate", "fast"][..], "want bytes per second with an optional K, M or G"),
    ] {
        let run = c.volume_cli("set", args);
        assert_ne!(run.code, 0);
        assert!(run.out.contains(says), "{}", run.out);
    }
    let run = c.volume_cli("get", &["bogus"]);
    assert_ne!(run.code, 0);
    assert!(run.out.contains("the options are"), "{}", run.out);

    let run = c.volume_cli("reset", &["cache.attr-timeout"]);
    assert_eq!(run.code, 0, "{}", run.out);
    mortar_tests::wait_for(
        "the mount to go back to the default",
        mortar_tests::DEADLINE,
        || {
            let applied = log().contains("kernel attribute and entry timeouts attr=1s");
            async move { applied.then_some(()) }
        },
    )
    .await;
}

/// Issue 23, acceptance 4: `volume stop` makes a live mount's operations fail at once with
/// ENOTCONN, the data stays, and `volume start` resumes the same mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_volume_fails_mount_operations_at_once_and_start_resumes_them() {
    let c = Cluster::start(3);
    c.create_volume("www", 1 << 20).await;
    let m = c.mount("www", "m", "").await;
    std::fs::create_dir(m.path.join("site")).unwrap();
    std::fs::write(m.path.join("site/index.html"), b"before the stop").unwrap();

    let run = c.volume_cli("stop", &[]);
    assert_eq!(run.code, 0, "{}", run.out);
    let stopped_at = std::time::Instant::now();
    assert!(c.volume_cli("info", &[]).out.contains("Status: Stopped"));
    // Each operation below reaches the mount (nothing it names is in the kernel's caches)
    // and must fail by itself, not after the mount's 30 s operation timeout.
    let errno_of = |what: &str, r: std::io::Result<()>, started: std::time::Instant| {
        let took = started.elapsed();
        eprintln!("{what} on the stopped volume: {r:?} after {took:?}");
        assert!(
            took < mortar_tests::mortar_client::DEFAULT_OP_TIMEOUT,
            "{what} waited {took:?}"
        );
        r.err().and_then(|e| e.raw_os_error())
    };
    let failed = mortar_tests::wait_for("operations to fail", mortar_tests::DEADLINE, || {
        let t = std::time::Instant::now();
        let r = std::fs::write(m.path.join("site/new.html"), b"x");
        let errno = errno_of("create", r, t);
        async move { errno }
    })
    .await;
    eprintln!(
        "operations failed {:?} after the stop returned",
        stopped_at.elapsed()
    );
    assert_eq!(failed, libc::ENOTCONN);
    let t = std::time::Instant::now();
    let r = std::fs::metadata(m.path.join("site/never-there.html")).map(|_| ());
    assert_eq!(errno_of("lookup", r, t), Some(libc::ENOTCONN));
    let t = std::time::Instant::now();
    let r = std::fs::read_dir(m.path.join("site")).map(|_| ());
    assert_eq!(errno_of("opendir", r, t), Some(libc::ENOTCONN));

    let run = c.volume_cli("start", &[]);
    assert_eq!(run.code, 0, "{}", run.out);
    mortar_tests::wait_for("the mount to work again", mortar_tests::DEADLINE, || {
        let ok = std::fs::write(m.path.join("site/new.html"), b"after the start").is_ok();
        async move { ok.then_some(()) }
    })
    .await;
    assert!(is_mounted(&m.path));
    assert_eq!(
        std::fs::read(m.path.join("site/index.html")).unwrap(),
        b"before the stop"
    );
    assert_eq!(
        std::fs::read(m.path.join("site/new.html")).unwrap(),
        b"after the start"
    );
}

/// `-o` options that make a mount use the client certificate `name` of the cluster's CA.
fn client_cert_options(c: &Cluster, name: &str) -> String {
    let (cert, key) = c.certs.issue(Role::Client, name);
    format!("cert={},key={}", cert.display(), key.display())
}

/// Issue 23, acceptance 5: a client not on `auth.allow` is refused at mount with one line and
/// disconnected when taken off it; a revoked certificate is refused at connect and its live
/// connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_and_revocation_refuse_new_and_close_live_connections() {
    let c = Cluster::start(3);
    c.create_volume("www", 1 << 20).await;
    let m1 = c.mount("www", "m1", "").await; // certificate "client"
    let run = c.volume_cli("set", &["auth.allow", "client,web1"]);
    assert_eq!(run.code, 0, "{}", run.out);
    std::fs::write(m1.path.join("a.html"), b"allowed").unwrap();

    let mnt = c.dir.path().join("refused");
    std::fs::create_dir(&mnt).unwrap();
    let web2 = format!(
        "{},{}",
        c.mount_options("refused"),
        client_cert_options(&c, "web2")
    );
    let out = run_mount(&[&c.source("www"), mnt.to_str().unwrap(), "-o", &web2]);
    assert_refused(
        &out,
        "client 'web2' is not on the allow list (auth.allow) of volume www",
        &mnt,
    );

    let m2 = c.mount("www", "m2", &client_cert_options(&c, "web1")).await;
    assert_eq!(std::fs::read(m2.path.join("a.html")).unwrap(), b"allowed");
    // Taken off the list: its open connections are closed and what it asks is refused.
    let run = c.volume_cli("set", &["auth.allow", "client"]);
    assert_eq!(run.code, 0, "{}", run.out);
    let off_at = std::time::Instant::now();
    let refused = |path: std::path::PathBuf| {
        mortar_tests::wait_for(
            "the mount to be refused",
            mortar_tests::DEADLINE,
            move || {
                let r = std::fs::write(&path, b"x");
                let errno = r.err().and_then(|e| e.raw_os_error());
                async move { errno }
            },
        )
    };
    let errno = refused(m2.path.join("new-web1.html")).await;
    eprintln!(
        "web1 refused {:?} after it left the allow list",
        off_at.elapsed()
    );
    assert_eq!(errno, libc::EPERM);
    assert!(
        (0..3).any(|i| c.log_contains(
            i,
            "closing a live connection: client 'web1' is not on the allow list"
        )),
        "no brick logged closing web1's connection"
    );
    std::fs::write(m1.path.join("b.html"), b"still allowed").unwrap();

    // Revoked: m1's certificate is refused from now on, its connections closed.
    let ca = c.certs.dir.to_str().unwrap().to_string();
    let bricks = c.addrs().join(",");
    let out = c.cli(&["cert", "revoke", "--ca", &ca, "client", "--bricks", &bricks]);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("revoked certificate 'client' (serial "),
        "{said}"
    );
    let revoked_at = std::time::Instant::now();
    let errno = refused(m1.path.join("new-client.html")).await;
    eprintln!(
        "the revoked client was refused {:?} after the revocation",
        revoked_at.elapsed()
    );
    assert_eq!(errno, libc::EPERM);
    let again = format!(
        "{},{}",
        c.mount_options("refused"),
        client_cert_options(&c, "client")
    );
    let out = run_mount(&[&c.source("www"), mnt.to_str().unwrap(), "-o", &again]);
    assert_refused(&out, "certificate 'client' (serial ", &mnt);
    assert_refused(&out, "is revoked for volume www", &mnt);
    let out = c.cli(&[
        "cert",
        "revoke",
        "--ca",
        &ca,
        "no-such-cert",
        "--bricks",
        &bricks,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a serial number"));

    // The data written before stays, read through a mount the rules still allow.
    let run = c.volume_cli("set", &["auth.allow", "*"]);
    assert_eq!(run.code, 0, "{}", run.out);
    let m3 = c.mount("www", "m3", &client_cert_options(&c, "web3")).await;
    assert_eq!(
        std::fs::read(m3.path.join("b.html")).unwrap(),
        b"still allowed"
    );
}

/// Issue 22, verified range reads: random reads of a large file through a fresh mount fetch
/// only the groups they cover (the bricks answer `get_range` and no whole chunk), every byte
/// matches; with two bricks' copies of a chunk rotten, reads of it are served by the third
/// brick's good copy, and the rotten ones are set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_fetch_verified_ranges_and_skip_rotten_copies() {
    use mortar_brick::store::CF_CHUNKS;
    use mortar_tests::metrics::{scrape, sum};
    use mortar_tests::mortar_proto::ChunkId;
    use std::os::unix::fs::FileExt;
    const MIB: usize = 1 << 20;
    let metrics_at = |i: usize, ip: &str| format!("{ip}:{}", 9101 + i);
    let mut c = Cluster::start_each(
        3,
        |i, ip| vec!["--metrics".into(), metrics_at(i, ip)],
        &[],
        |_| None,
    );
    c.create_volume("www", MIB as u32).await;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let body: Vec<u8> = (0..3 * MIB + 777)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    {
        let w = c.mount("www", "writer", "").await;
        std::fs::write(w.path.join("big.bin"), &body).unwrap();
    }
    let ip = c.ip.clone();
    let count = |op: &str| -> f64 {
        (0..3)
            .map(|i| {
                sum(
                    &scrape(&metrics_at(i, &ip)),
                    "mortar_brick_requests_total",
                    &format!("op=\"{op}\""),
                )
            })
            .sum()
    };
    let offsets = [2 * MIB + 5000, 100_000, MIB + 70_000, 3 * MIB + 100];
    let read_all = |path: &Path| {
        let f = std::fs::File::open(path).unwrap();
        for off in offsets {
            let mut buf = vec![0u8; 4096];
            let n = f.read_at(&mut buf, off as u64).unwrap();
            let want = &body[off..(off + 4096).min(body.len())];
            assert_eq!(n, want.len(), "short read at {off}");
            assert!(buf[..n] == *want, "wrong bytes at {off}");
        }
    };
    let (chunks, ranges) = (count("get_chunk"), count("get_range"));
    {
        let r = c.mount("www", "reader", "").await;
        read_all(&r.path.join("big.bin"));
    }
    let ranges_read = count("get_range") - ranges;
    assert!(
        ranges_read >= offsets.len() as f64,
        "{ranges_read} range reads for {} random reads",
        offsets.len()
    );
    assert_eq!(
        count("get_chunk"),
        chunks,
        "a random read fetched a whole chunk"
    );

    // The third chunk's copies on bricks 0 and 1 rot; reads of it still get the right bytes.
    let third = ChunkId::of(&body[2 * MIB..3 * MIB]);
    for i in [0, 1] {
        c.tamper(i, move |s| {
            s.db.put_cf(s.cf(CF_CHUNKS), third.0, b"bit rot".repeat(1000))
                .unwrap()
        })
        .await;
    }
    let r = c.mount("www", "after-rot", "").await;
    read_all(&r.path.join("big.bin"));
    mortar_tests::wait_for(
        "a brick to set a rotten copy aside",
        mortar_tests::DEADLINE,
        || {
            let found = (0..2).any(|i| c.log_contains(i, "stored chunk fails verification"));
            async move { found.then_some(()) }
        },
    )
    .await;
}

/// Issue 22: a fresh mount's first listing of a directory brings its small files whole. The
/// kernel keeps the names a listing gave it (readdirplus), so the opens that follow reach the
/// mount without a lookup first: before, each of them fetched its inode from the bricks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_brings_small_files_so_reading_them_asks_nothing_more() {
    use mortar_tests::metrics::{scrape, sum};
    let c = Cluster::start(3);
    c.create_volume("www", 1 << 20).await;
    let w = c.mount("www", "writer", "").await;
    let (dirs, files) = (4, 30);
    let body = |d: usize, f: usize| format!("{d}/{f} ").repeat(100);
    for d in 0..dirs {
        std::fs::create_dir(w.path.join(format!("d{d}"))).unwrap();
        for f in 0..files {
            std::fs::write(w.path.join(format!("d{d}/f{f}")), body(d, f)).unwrap();
        }
        std::fs::File::open(w.path.join(format!("d{d}")))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    let metrics = format!("{}:9200", c.ip);
    let r = c
        .mount("www", "reader", &format!("metrics={metrics}"))
        .await;
    let count = |name: &str, labels: &str| sum(&scrape(&metrics), name, labels);
    leased(&r, &metrics).await;
    let mut asked = 0.0;
    for d in 0..dirs {
        let dir = r.path.join(format!("d{d}"));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), files);
        let before = count("mortar_mount_namespace_requests_total", "");
        for f in 0..files {
            let got = std::fs::read_to_string(dir.join(format!("f{f}"))).unwrap();
            assert_eq!(got, body(d, f));
        }
        asked += count("mortar_mount_namespace_requests_total", "") - before;
    }
    assert!(
        asked < dirs as f64,
        "reading {} listed files asked the bricks {asked} times",
        dirs * files
    );
}

/// Wait until mount `m` (metrics at `metrics`) answers a lookup from memory: listings come
/// whole, and reads ahead happen, only under the watch's lease (the kernel keeps no "no such
/// name", so each probe reaches the mount).
async fn leased(m: &Mount, metrics: &str) {
    use mortar_tests::metrics::{scrape, sum};
    let hits = || {
        sum(
            &scrape(metrics),
            "mortar_mount_cache_hits_total",
            "cache=\"meta\"",
        )
    };
    let mut probe = 0;
    mortar_tests::wait_for("the mount to hold a lease", mortar_tests::DEADLINE, || {
        probe += 1;
        let before = hits();
        assert!(std::fs::metadata(m.path.join(format!("probe{probe}"))).is_err());
        let now = hits();
        async move { (now > before).then_some(()) }
    })
    .await;
}

/// A reader going through a tree file by file, by path (no listing of its own), on a mount
/// that has never seen it: the next files' first chunks are fetched ahead of it and the
/// subdirectories of the directory it is in are listed ahead, and every byte it reads is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_going_through_a_tree_is_read_ahead_of() {
    use mortar_tests::metrics::{scrape, sum};
    let c = Cluster::start(3);
    c.create_volume("www", mortar_tests::mortar_proto::DEFAULT_CHUNK_SIZE)
        .await;
    let w = c.mount("www", "writer", "").await;
    let (dirs, large) = (4, 20);
    let body = |d: usize, f: usize, n: usize| format!("{d}/{f} ").repeat(n);
    // Each directory: a small (inline) file first, then files of one chunk each.
    let mut files = Vec::new();
    for d in 0..dirs {
        let dir = format!("tree/s{d}");
        std::fs::create_dir_all(w.path.join(&dir)).unwrap();
        files.push((format!("{dir}/a.txt"), body(d, 0, 10)));
        for f in 0..large {
            files.push((format!("{dir}/f{f:02}"), body(d, f, 40_000)));
        }
    }
    for (path, content) in &files {
        std::fs::write(w.path.join(path), content).unwrap();
    }
    let sync = |p: &str| {
        std::fs::File::open(w.path.join(p))
            .unwrap()
            .sync_all()
            .unwrap()
    };
    for d in 0..dirs {
        sync(&format!("tree/s{d}"));
    }
    sync("tree");

    let metrics = format!("{}:9201", c.ip);
    let r = c
        .mount("www", "reader", &format!("metrics={metrics}"))
        .await;
    leased(&r, &metrics).await;
    let root = r.path.clone();
    let wrong = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .filter(|(path, content)| {
                std::fs::read(root.join(path)).ok() != Some(content.clone().into_bytes())
            })
            .map(|(path, _)| path)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(wrong.is_empty(), "read wrong: {wrong:?}");
    let m = scrape(&metrics);
    let (files_ahead, dirs_ahead) = (
        sum(&m, "mortar_mount_files_read_ahead_total", ""),
        sum(&m, "mortar_mount_dirs_listed_ahead_total", ""),
    );
    eprintln!("files read ahead: {files_ahead}; directories listed ahead: {dirs_ahead}");
    // Each directory's large files follow a small one, so each can be fetched ahead, once.
    assert!(
        files_ahead > 0.0 && files_ahead <= (dirs * large) as f64,
        "{files_ahead} files read ahead of {}",
        dirs * large
    );
    // The first look into `tree` lists its subdirectories ahead: at least the last ones are
    // listed before the reader, twenty files later, gets to them (and the root's look, `tree`).
    assert!(
        dirs_ahead >= 1.0 && dirs_ahead <= (dirs + 1) as f64,
        "{dirs_ahead} directories listed ahead of {}",
        dirs + 1
    );
}
