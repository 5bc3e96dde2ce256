//! Reading the Prometheus endpoints of bricks and mounts in tests: each scrape is fetched with
//! curl and checked by the prometheus_client library's own parser.

use std::collections::BTreeMap;

/// One scrape of a metrics endpoint, checked by the prometheus_client library's parser
/// (`scripts/check-metrics.py`): sample `NAME{labels}` → value, and `# NAME` → 0 for each
/// family (served even while it has no samples).
pub fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let url = format!("http://{addr}/metrics");
    let got = std::process::Command::new("curl")
        .args(["-sSf", "--max-time", "20", &url])
        .output()
        .expect("run curl");
    assert!(
        got.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    let mut check = std::process::Command::new("/usr/bin/python3")
        .arg(crate::repo().join("scripts/check-metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run check-metrics.py");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), &got.stdout).unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "{url} is not valid Prometheus text: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    String::from_utf8(checked.stdout)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(family) => (format!("# {}", family.split(' ').next().unwrap()), 0.0),
            None => {
                let (k, v) = l.split_once('\t').expect("NAME\tVALUE");
                (k.to_string(), v.parse().expect("a number"))
            }
        })
        .collect()
}

/// The sum of every sample named `name` whose labels contain `labels` (e.g. `op="create"`).
pub fn sum(samples: &BTreeMap<String, f64>, name: &str, labels: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(labels))
        .map(|(_, v)| v)
        .sum()
}
