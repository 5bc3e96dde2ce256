//! Issue "Mount a volume as a web document root": POSIX behaviour through a real FUSE mount of
//! a real three-brick volume, checked with ordinary syscalls.

use mortar_tests::{is_mounted, wait_for, Cluster, DEADLINE};
use rand::{Rng, SeedableRng};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("operation should fail")
        .raw_os_error()
        .expect("an errno")
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn rename2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(from).as_ptr(),
            libc::AT_FDCWD,
            c(to).as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn utimens(p: &Path, atime: libc::timespec, mtime: libc::timespec) {
    let times = [atime, mtime];
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), times.as_ptr(), 0) };
    assert_eq!(rc, 0, "utimensat: {}", std::io::Error::last_os_error());
}

/// Files: create/excl/trunc/append, sparse, truncate, multi-chunk unaligned writes against a
/// model, size visible right after an extending write, fsync, open-unlinked, fallocate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_data_semantics() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 64 * 1024).await;
    let m = cl.mount("www", "mnt", "").await;
    let d = &m.path;

    // O_CREAT|O_EXCL, O_TRUNC.
    let f = d.join("a.txt");
    fs::write(&f, b"hello world").unwrap();
    assert_eq!(
        errno(OpenOptions::new().write(true).create_new(true).open(&f)),
        libc::EEXIST
    );
    assert_eq!(fs::read(&f).unwrap(), b"hello world");
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&f)
        .unwrap()
        .write_all(b"hi")
        .unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"hi");

    // O_APPEND from two handles.
    let log = d.join("append.log");
    let mut h1 = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut h2 = OpenOptions::new().append(true).open(&log).unwrap();
    for i in 0..20 {
        h1.write_all(format!("one {i}\n").as_bytes()).unwrap();
        h2.write_all(format!("two {i}\n").as_bytes()).unwrap();
    }
    drop((h1, h2));
    let text = fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 40, "{text}");
    for i in 0..20 {
        assert!(text.contains(&format!("one {i}\n")) && text.contains(&format!("two {i}\n")));
    }

    // Sparse: a write far past the end reads back zeros before it.
    let sparse = d.join("sparse");
    let fh = File::create(&sparse).unwrap();
    fh.write_at(b"tail", 3_000_000).unwrap();
    assert_eq!(
        fh.metadata().unwrap().len(),
        3_000_004,
        "size visible to the writer at once"
    );
    drop(fh);
    let all = fs::read(&sparse).unwrap();
    assert_eq!(all.len(), 3_000_004);
    assert!(all[..3_000_000].iter().all(|b| *b == 0));
    assert_eq!(&all[3_000_000..], b"tail");

    // Unaligned writes across many 64 KiB chunks, against an in-memory model.
    let big = d.join("big.bin");
    let mut model = vec![0u8; 0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let fh = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&big)
        .unwrap();
    for _ in 0..60 {
        let off = rng.random_range(0..700_000usize);
        let len = rng.random_range(1..150_000usize);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        fh.write_all_at(&data, off as u64).unwrap();
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&data);
        assert_eq!(fh.metadata().unwrap().len(), model.len() as u64);
    }
    fh.sync_all().unwrap();
    let mut back = vec![0u8; model.len()];
    fh.read_exact_at(&mut back, 0).unwrap();
    assert!(back == model, "read through the writing handle differs");
    drop(fh);
    assert!(
        fs::read(&big).unwrap() == model,
        "read after reopen differs"
    );

    // Truncate down (mid-chunk) and up: the cut bytes do not come back as anything but zeros.
    let fh = OpenOptions::new().write(true).open(&big).unwrap();
    fh.set_len(100_001).unwrap();
    fh.set_len(300_000).unwrap();
    drop(fh);
    let after = fs::read(&big).unwrap();
    assert_eq!(after.len(), 300_000);
    assert_eq!(&after[..100_001], &model[..100_001]);
    assert!(after[100_001..].iter().all(|b| *b == 0));

    // An unlinked open file stays readable through its handle.
    let gone = d.join("gone.txt");
    fs::write(&gone, vec![5u8; 200_000]).unwrap();
    let mut rd = File::open(&gone).unwrap();
    fs::remove_file(&gone).unwrap();
    assert_eq!(errno(fs::metadata(&gone)), libc::ENOENT);
    let mut got = Vec::new();
    rd.read_to_end(&mut got).unwrap();
    assert_eq!(got, vec![5u8; 200_000]);
    rd.seek(SeekFrom::Start(10)).unwrap();
    drop(rd);

    // Preallocation extends; punch-hole and zero-range are refused, not silently accepted.
    let pre = File::create(d.join("prealloc")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&pre);
    assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 5000) }, 0);
    assert_eq!(pre.metadata().unwrap().len(), 5000);
    let rc = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            100,
        )
    };
    assert_eq!(
        (rc, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EOPNOTSUPP))
    );
    let rc = unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, 0, 100) };
    assert_eq!(
        (rc, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EOPNOTSUPP))
    );
}

/// Directories and names: mkdir/rmdir, rename edge cases, links, symlinks, FIFOs, readdir
/// offsets under concurrent change, and the errno of each failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_semantics() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let m = cl.mount("www", "mnt", "").await;
    let d = &m.path;

    fs::create_dir(d.join("dir")).unwrap();
    assert_eq!(errno(fs::create_dir(d.join("dir"))), libc::EEXIST);
    fs::write(d.join("dir/f"), b"x").unwrap();
    assert_eq!(errno(fs::remove_dir(d.join("dir"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_file(d.join("dir"))), libc::EISDIR);
    assert_eq!(errno(fs::create_dir(d.join("dir/f/sub"))), libc::ENOTDIR);
    assert_eq!(errno(fs::read(d.join("missing"))), libc::ENOENT);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(d.join("dir"))),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs::write(d.join("x".repeat(256)), b"")),
        libc::ENAMETOOLONG
    );
    fs::write(d.join("y".repeat(255)), b"ok").unwrap();

    // rename: over a file, over an empty dir, onto a non-empty dir, NOREPLACE, EXCHANGE.
    fs::write(d.join("r1"), b"one").unwrap();
    fs::write(d.join("r2"), b"two").unwrap();
    fs::rename(d.join("r1"), d.join("r2")).unwrap();
    assert_eq!(fs::read(d.join("r2")).unwrap(), b"one");
    assert_eq!(errno(fs::metadata(d.join("r1"))), libc::ENOENT);
    fs::create_dir(d.join("empty")).unwrap();
    fs::create_dir(d.join("moving")).unwrap();
    fs::rename(d.join("moving"), d.join("empty")).unwrap();
    assert_eq!(
        errno(fs::rename(d.join("empty"), d.join("dir"))),
        libc::ENOTEMPTY
    );
    fs::write(d.join("r3"), b"three").unwrap();
    assert_eq!(
        errno(rename2(
            &d.join("r3"),
            &d.join("r2"),
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    rename2(&d.join("r3"), &d.join("r2"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(d.join("r2")).unwrap(), b"three");
    assert_eq!(fs::read(d.join("r3")).unwrap(), b"one");
    fs::rename(d.join("r3"), d.join("dir/moved")).unwrap();
    assert_eq!(fs::read(d.join("dir/moved")).unwrap(), b"one");

    // Hard links share one inode; symlinks; FIFOs.
    fs::hard_link(d.join("r2"), d.join("r2-link")).unwrap();
    let (a, b) = (
        fs::metadata(d.join("r2")).unwrap(),
        fs::metadata(d.join("r2-link")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    fs::set_permissions(d.join("r2-link"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(d.join("r2")).unwrap().mode() & 0o777, 0o600);
    std::os::unix::fs::symlink("dir/moved", d.join("sym")).unwrap();
    assert_eq!(
        fs::read_link(d.join("sym")).unwrap(),
        Path::new("dir/moved")
    );
    assert_eq!(fs::read(d.join("sym")).unwrap(), b"one");
    assert_eq!(
        unsafe { libc::mkfifo(c(&d.join("fifo")).as_ptr(), 0o644) },
        0
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(d.join("fifo")).unwrap().file_type()
    ));

    // readdir: entries present throughout are returned exactly once even while the directory
    // changes between getdents calls.
    let big = d.join("big");
    fs::create_dir(&big).unwrap();
    let name = |i: usize| format!("{i:04}-{}", "n".repeat(180));
    for i in 0..300 {
        fs::write(big.join(name(i)), b"").unwrap();
    }
    let mut it = fs::read_dir(&big).unwrap();
    let mut seen: Vec<String> = (&mut it)
        .take(40)
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for i in 300..360 {
        fs::write(big.join(name(i)), b"").unwrap();
    }
    seen.extend(it.map(|e| e.unwrap().file_name().into_string().unwrap()));
    let unique: std::collections::BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an entry was returned twice");
    for i in 0..300 {
        assert!(unique.contains(&name(i)), "entry {i} was skipped");
    }
    assert_eq!(fs::read_dir(&big).unwrap().count(), 360);
}

/// A node's link count follows every unlink of one of its names, whatever its kind and however
/// the directory is held (made by this mount, so delegated to it, or made elsewhere): a
/// removal answered from memory shows what it left (pjdfstest's link/remove_link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_counts_follow_unlinks_of_every_kind_of_node() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let m = cl.mount("www", "mnt", "").await;
    let kinds = [
        ("regular", libc::S_IFREG),
        ("fifo", libc::S_IFIFO),
        ("block", libc::S_IFBLK),
        ("char", libc::S_IFCHR),
        ("socket", libc::S_IFSOCK),
    ];
    for round in 0..3 {
        for (kind, mode) in kinds {
            // A directory of its own, as pjdfstest makes for each case; in the first round
            // the node is the first thing made in it.
            let d = m.path.join(format!("{kind}-dir"));
            if round == 0 {
                fs::create_dir(&d).unwrap();
            }
            let file = d.join(format!("{kind}{round}"));
            let rc = unsafe { libc::mknod(c(&file).as_ptr(), mode | 0o644, libc::makedev(1, 2)) };
            assert_eq!(rc, 0, "mknod {kind}: {}", std::io::Error::last_os_error());
            let (first, second) = (
                d.join(format!("{kind}{round}.1")),
                d.join(format!("{kind}{round}.2")),
            );
            fs::hard_link(&file, &first).unwrap();
            fs::hard_link(&first, &second).unwrap();
            fs::remove_file(&file).unwrap();
            let (a, b) = (
                fs::symlink_metadata(&first).unwrap(),
                fs::symlink_metadata(&second).unwrap(),
            );
            assert_eq!((a.nlink(), b.nlink()), (2, 2), "{kind} round {round}");
            assert_eq!(
                (a.ino(), a.ctime(), a.ctime_nsec()),
                (b.ino(), b.ctime(), b.ctime_nsec())
            );
            fs::remove_file(&second).unwrap();
            assert_eq!(
                fs::symlink_metadata(&first).unwrap().nlink(),
                1,
                "{kind} round {round} after its second unlink"
            );
            fs::remove_file(&first).unwrap();
            assert_eq!(errno(fs::symlink_metadata(&first)), libc::ENOENT);
        }
    }
}

/// Attributes, xattrs and statfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_xattrs_statfs() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let m = cl.mount("www", "mnt", "").await;
    let f = m.path.join("f");
    fs::write(&f, b"data").unwrap();

    fs::set_permissions(&f, fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o4751);
    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));

    let t = |s, ns| libc::timespec {
        tv_sec: s,
        tv_nsec: ns,
    };
    utimens(
        &f,
        t(1_500_000_000, 123_456_789),
        t(1_600_000_000, 987_654_321),
    );
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_500_000_000, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 987_654_321));
    utimens(&f, t(0, libc::UTIME_OMIT), t(0, libc::UTIME_NOW));
    let md = fs::metadata(&f).unwrap();
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (1_500_000_000, 123_456_789),
        "UTIME_OMIT changed atime"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (md.mtime() - now).abs() < 60,
        "UTIME_NOW gave {}",
        md.mtime()
    );

    xattr::set(&f, "user.color", b"blue").unwrap();
    xattr::set(&f, "security.label", b"web").unwrap();
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 0)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    xattr::set(&f, "system.posix_acl_access", &acl).unwrap();
    assert_eq!(xattr::get(&f, "user.color").unwrap().unwrap(), b"blue");
    assert_eq!(xattr::get(&f, "security.label").unwrap().unwrap(), b"web");
    assert_eq!(
        xattr::get(&f, "system.posix_acl_access").unwrap().unwrap(),
        acl
    );
    assert_eq!(
        fs::metadata(&f).unwrap().mode() & 0o777,
        0o640,
        "the ACL sets the mode bits"
    );
    let names: Vec<_> = xattr::list(&f).unwrap().collect();
    assert!(names.iter().any(|n| n == "user.color") && names.iter().any(|n| n == "security.label"));
    xattr::remove(&f, "user.color").unwrap();
    assert_eq!(xattr::get(&f, "user.color").unwrap(), None);
    assert_eq!(errno(xattr::remove(&f, "user.color")), libc::ENODATA);

    // Changes made through a file whose data is still buffered show at once and survive the
    // flush at close; a write after utimens moves mtime again.
    let g = m.path.join("g");
    let mut h = File::create(&g).unwrap();
    h.write_all(b"buffered").unwrap();
    h.set_permissions(fs::Permissions::from_mode(0o604))
        .unwrap();
    std::os::unix::fs::fchown(&h, Some(42), Some(43)).unwrap();
    let old = [t(1_300_000_000, 5), t(1_300_000_000, 5)];
    assert_eq!(unsafe { libc::futimens(h.as_raw_fd(), old.as_ptr()) }, 0);
    xattr::FileExt::set_xattr(&h, "user.k", b"v").unwrap();
    let owner_mode_time = |md: fs::Metadata| {
        (
            md.mode() & 0o7777,
            md.uid(),
            md.gid(),
            md.mtime(),
            md.mtime_nsec(),
        )
    };
    let expected = (0o604, 42, 43, 1_300_000_000, 5);
    assert_eq!(owner_mode_time(h.metadata().unwrap()), expected);
    assert_eq!(h.metadata().unwrap().size(), 8);
    drop(h);
    assert_eq!(owner_mode_time(fs::metadata(&g).unwrap()), expected);
    assert_eq!(xattr::get(&g, "user.k").unwrap().unwrap(), b"v");
    assert_eq!(fs::read(&g).unwrap(), b"buffered");
    let mut h = OpenOptions::new().write(true).open(&g).unwrap();
    h.write_all(b"x").unwrap();
    assert_eq!(unsafe { libc::futimens(h.as_raw_fd(), old.as_ptr()) }, 0);
    h.write_all(b"y").unwrap();
    drop(h);
    let md = fs::metadata(&g).unwrap();
    assert!(
        (md.mtime() - now).abs() < 60,
        "mtime {} after a later write",
        md.mtime()
    );
    assert_eq!(fs::read(&g).unwrap(), b"xyffered");

    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c(&m.path).as_ptr(), &mut st) }, 0);
    assert!(
        st.f_blocks > 0 && st.f_bavail > 0 && st.f_bsize > 0,
        "statfs reports no capacity"
    );
    assert_eq!(st.f_namemax, 255);

    // Terminal ioctls on a file fail with ENOTTY, as on a local filesystem, and leave no
    // warning in the mount's log (Python asks on every open).
    let file = fs::File::open(&f).unwrap();
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TCGETS, &mut tio) };
    assert_eq!(
        (r, errno::<()>(Err(std::io::Error::last_os_error()))),
        (-1, libc::ENOTTY)
    );
    let log = fs::read_to_string(&m.log).unwrap();
    let warned = log.lines().find(|l| l.contains("Not Implemented"));
    assert_eq!(warned, None, "the mount warned about an ioctl");
}

/// `cp -a` into the mount keeps what it copies (owner, mode, nanosecond mtime, xattrs, content),
/// as this mount and a second one see it: attributes set through an open file with buffered
/// data must not be overwritten when that data is flushed at close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_a_preserves_what_it_copies() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 64 * 1024).await;
    let a = cl.mount("www", "a", "").await;
    let src = cl.dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    let files = [
        ("small.html", 700usize, 0o644, (33, 33)),
        ("sub/script.php", 20_000, 0o640, (1234, 5678)),
        ("sub/big.css", 200_000, 0o600, (0, 33)),
        ("empty", 0, 0o755, (7, 7)),
    ];
    for (i, (name, len, mode, (uid, gid))) in files.iter().enumerate() {
        let p = src.join(name);
        let body: Vec<u8> = (0..*len).map(|k| (k * 13 + i) as u8).collect();
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        std::os::unix::fs::chown(&p, Some(*uid), Some(*gid)).unwrap();
        xattr::set(&p, "user.origin", name.as_bytes()).unwrap();
        let t = libc::timespec {
            tv_sec: 1_400_000_000 + i as i64,
            tv_nsec: 123_456_789,
        };
        utimens(&p, t, t);
    }
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(a.path.join("copy"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = cl.mount("www", "b", "").await;
    for m in [&a, &b] {
        for (name, ..) in &files {
            let (s, d) = (src.join(name), m.path.join("copy").join(name));
            let (ms, md) = (fs::metadata(&s).unwrap(), fs::metadata(&d).unwrap());
            let seen = |x: &fs::Metadata| {
                (
                    x.mode(),
                    x.uid(),
                    x.gid(),
                    x.size(),
                    x.mtime(),
                    x.mtime_nsec(),
                )
            };
            assert_eq!(seen(&md), seen(&ms), "{} in {}", name, m.path.display());
            assert_eq!(fs::read(&d).unwrap(), fs::read(&s).unwrap(), "{name}");
            assert_eq!(
                xattr::get(&d, "user.origin").unwrap().unwrap(),
                name.as_bytes(),
                "{name}"
            );
        }
    }
}

/// Two mounts of one volume: close-to-open consistency and renames seen across mounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mounts_see_each_others_changes() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 64 * 1024).await;
    let a = cl.mount("www", "a", "").await;
    let b = cl.mount("www", "b", "").await;

    let v1: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(a.path.join("page.html"), &v1).unwrap();
    assert_eq!(fs::read(b.path.join("page.html")).unwrap(), v1);
    // Overwrite in place (same size), then with a shorter file: the reader's next open sees it.
    for round in 0..3u8 {
        let v: Vec<u8> = v1.iter().map(|x| x.wrapping_add(round + 1)).collect();
        let v = if round == 2 { v[..1000].to_vec() } else { v };
        fs::write(a.path.join("page.html"), &v).unwrap();
        assert!(
            fs::read(b.path.join("page.html")).unwrap() == v,
            "stale read in round {round}"
        );
    }

    // A tree made in A is whole and current in B at once. A directory A made is delegated to
    // A, so A's closes there commit nothing of their own; B's first look recalls the
    // delegation, and A commits everything it holds before B gets an answer.
    let site = a.path.join("site");
    fs::create_dir(&site).unwrap();
    fs::create_dir(site.join("css")).unwrap();
    let mut made = Vec::new();
    for i in 0..50u32 {
        let rel = if i % 2 == 0 {
            format!("site/css/s{i}.css")
        } else {
            format!("site/p{i}.php")
        };
        let body: Vec<u8> = (0..(i * 997) % 70_000).map(|k| (k ^ i) as u8).collect();
        fs::write(a.path.join(&rel), &body).unwrap();
        fs::set_permissions(a.path.join(&rel), fs::Permissions::from_mode(0o640)).unwrap();
        made.push((rel, body));
    }
    std::os::unix::fs::symlink("p1.php", site.join("index.php")).unwrap();
    for (rel, body) in &made {
        let seen = b.path.join(rel);
        assert_eq!(&fs::read(&seen).unwrap(), body, "{rel}");
        let mode = fs::metadata(&seen).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{rel}");
    }
    assert_eq!(
        fs::read_link(b.path.join("site/index.php")).unwrap(),
        Path::new("p1.php")
    );
    // After the recall, A's changes there go to the bricks as they are made; B sees them.
    fs::write(site.join("p1.php"), b"changed").unwrap();
    assert_eq!(fs::read(b.path.join("site/p1.php")).unwrap(), b"changed");

    fs::rename(a.path.join("page.html"), a.path.join("moved.html")).unwrap();
    let moved = b.path.join("moved.html");
    wait_for("the rename to show in the other mount", DEADLINE, || {
        let ok = moved.exists() && !b.path.join("page.html").exists();
        async move { ok.then_some(()) }
    })
    .await;
}

/// A read-only mount serves reads and refuses every change with EROFS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_mount_refuses_writes() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let rw = cl.mount("www", "rw", "").await;
    fs::write(rw.path.join("f"), b"content").unwrap();
    let ro = cl.mount("www", "ro", "ro").await;
    assert_eq!(fs::read(ro.path.join("f")).unwrap(), b"content");
    assert_eq!(errno(fs::write(ro.path.join("g"), b"x")), libc::EROFS);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(ro.path.join("f"))),
        libc::EROFS
    );
    assert_eq!(errno(fs::create_dir(ro.path.join("d"))), libc::EROFS);
    assert_eq!(errno(fs::remove_file(ro.path.join("f"))), libc::EROFS);
    assert!(is_mounted(&ro.path));
}

/// Issue 18, bug 2: sizes and offsets past the maximum file size (16 TiB) get EFBIG from
/// truncate, ftruncate, pwrite and fallocate, and change nothing; sizes up to it are sparse
/// and cost nothing. The mount keeps serving throughout (each refusal is followed by a stat
/// and a read). Both in the root (changes committed at once) and in a directory the mount
/// made (changes held under its delegation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_sizes_and_offsets_are_efbig_or_sparse() {
    use mortar_tests::mortar_proto::MAX_FILE_SIZE;
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let m = cl.mount("www", "mnt", "").await;
    fs::create_dir(m.path.join("made")).unwrap();
    let files = [m.path.join("f"), m.path.join("made/f")];
    let path = files.clone();
    tokio::task::spawn_blocking(move || {
        for f in &path {
            huge_offsets_on(f, MAX_FILE_SIZE);
        }
    })
    .await
    .unwrap();
    // Another mount sees what the refusals left: the content as written, nothing else.
    let other = cl.mount("www", "other", "").await;
    for rel in ["f", "made/f"] {
        assert_eq!(
            fs::read(other.path.join(rel)).unwrap(),
            b"keep me, then more"
        );
    }
    assert!(is_mounted(&m.path));
}

fn huge_offsets_on(f: &Path, max: u64) {
    let intact = |what: &str| {
        let meta = fs::metadata(f).unwrap_or_else(|e| panic!("stat after {what}: {e}"));
        assert_eq!(meta.len(), 7, "size after {what}");
        assert_eq!(fs::read(f).unwrap(), b"keep me", "content after {what}");
    };
    fs::write(f, b"keep me").unwrap();
    let huge: [u64; 4] = [i64::MAX as u64, 9_000_000_000_000_000_000, 1 << 60, max + 1];
    for size in huge {
        let rc = unsafe { libc::truncate(c(f).as_ptr(), size as i64) };
        assert_eq!(rc, -1, "truncate to {size} succeeded");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EFBIG)
        );
        intact(&format!("truncate to {size}"));
        let h = OpenOptions::new().read(true).write(true).open(f).unwrap();
        assert_eq!(errno(h.set_len(size)), libc::EFBIG, "ftruncate to {size}");
        drop(h);
        intact(&format!("ftruncate to {size}"));
    }
    // pwrite and fallocate whose end lies past the maximum; dd's seek=1000000000000000 too.
    for offset in [i64::MAX as u64 - 1, 1_000_000_000_000_000, max] {
        let h = OpenOptions::new().read(true).write(true).open(f).unwrap();
        assert_eq!(
            errno(h.write_at(b"x", offset)),
            libc::EFBIG,
            "pwrite at {offset}"
        );
        let rc = unsafe { libc::fallocate(h.as_raw_fd(), 0, offset as i64, 1) };
        assert_eq!(rc, -1, "fallocate at {offset} succeeded");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EFBIG)
        );
        drop(h);
        intact(&format!("pwrite and fallocate at {offset}"));
    }
    // Up to the maximum a file is sparse: nothing is stored for the holes.
    let h = OpenOptions::new().read(true).write(true).open(f).unwrap();
    h.set_len(max).expect("ftruncate to the maximum size");
    assert_eq!(fs::metadata(f).unwrap().len(), max);
    let mut tail = [1u8; 4];
    h.read_exact_at(&mut tail, max - 4).unwrap();
    assert_eq!(tail, [0; 4]);
    h.write_all_at(b"end", max - 3).unwrap();
    h.write_all_at(b"mid", 1 << 40).unwrap();
    h.sync_all().unwrap();
    let mut back = [0u8; 3];
    h.read_exact_at(&mut back, max - 3).unwrap();
    assert_eq!(&back, b"end");
    h.read_exact_at(&mut back, 1 << 40).unwrap();
    assert_eq!(&back, b"mid");
    let rc = unsafe { libc::fallocate(h.as_raw_fd(), 0, 0, max as i64) };
    assert_eq!(
        rc,
        0,
        "fallocate within the maximum: {}",
        std::io::Error::last_os_error()
    );
    h.set_len(7).unwrap();
    drop(h);
    intact("truncating the sparse file back");
    let mut h = OpenOptions::new().append(true).open(f).unwrap();
    h.write_all(b", then more").unwrap();
    h.sync_all().unwrap();
}
