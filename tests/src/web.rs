//! A web server over a mount, as the people we build for run one: nginx serving a document
//! root as www-data, and a plain HTTP client to ask it.

use crate::{wait_for, DEADLINE};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// GET a path over plain HTTP/1.0; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u32, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to nginx");
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, resp[split + 4..].to_vec())
}

/// nginx serving `root` on `listen` as www-data, the way a web server reads a document root:
/// as a user other than the one who mounted it. Stopped (the master and its worker) on drop.
pub struct Nginx(std::process::Child);

impl Nginx {
    pub async fn start(dir: &Path, listen: &str, root: &Path) -> Nginx {
        let nginx = "/usr/sbin/nginx";
        assert!(
            Path::new(nginx).exists(),
            "nginx is missing: scripts/test.sh installs nginx-light"
        );
        // www-data must be able to walk from / to the mount point.
        for dir in root.ancestors().skip(1) {
            let mode = std::fs::metadata(dir).unwrap().permissions().mode();
            if mode & 0o005 != 0o005 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o755))
                    .unwrap();
            }
        }
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "user www-data;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log off; client_body_temp_path {d}/ngx-body; proxy_temp_path {d}/ngx-proxy;\n\
                 fastcgi_temp_path {d}/ngx-fcgi; uwsgi_temp_path {d}/ngx-uwsgi; scgi_temp_path {d}/ngx-scgi;\n\
                 server {{ listen {listen}; root {}; }} }}\n",
                root.display()
            ),
        )
        .unwrap();
        let child = Command::new(nginx)
            .args(["-c", conf.to_str().unwrap(), "-g", "daemon off;"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx");
        let server = Nginx(child);
        let l = listen.to_string();
        wait_for("nginx to listen", DEADLINE, || {
            let up = std::net::TcpStream::connect(&l).is_ok();
            async move { up.then_some(()) }
        })
        .await;
        server
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker before it exits.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.0.try_wait().ok().flatten().is_none() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
