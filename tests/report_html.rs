//! `report.html` in a real browser: headless Chromium (Debian's `chromium`,
//! which `.ci/run` installs) loads the file from `file://`, runs its script,
//! and the test reads the resulting page (`--dump-dom`) and takes a screenshot.

mod common;
use common::*;

fn chromium() -> String {
    std::env::var("KVT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Runs headless Chromium on `url` with `extra` flags; returns stdout.
fn browse(profile: &std::path::Path, url: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("start chromium (set KVT_CHROMIUM, or install Debian's chromium)");
    assert!(out.status.success(), "{}", stderr_of(&out));
    stdout_of(&out)
}

fn showing(dom: &str) -> (usize, usize) {
    let i = dom.find("showing ").expect("the page shows its count");
    let words: Vec<&str> = dom[i..].split_whitespace().collect();
    (words[1].parse().unwrap(), words[3].parse().unwrap())
}

#[test]
#[ignore = "needs Chromium (see .ci/run)"]
fn report_html_in_a_real_browser() {
    // The README's main job: the demo, 200 examples, as a user runs it.
    let p = Project::new();
    p.copy_from_repo(&["config/experiments/demo.yaml"]);
    let out = p
        .kvt()
        .args([
            "build",
            "report",
            "-q",
            "-c",
            "config/experiments/demo.yaml",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let page = p.path("runs/demo/report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no network"
    );
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", page.display());

    // Everything: all 200 examples, the summary and the compact table.
    let dom = browse(profile.path(), &url, &["--dump-dom"]);
    assert_eq!(showing(&dom), (200, 200));
    assert!(dom.contains("KV transition report: demo"));
    assert!(dom.contains("fails at every length"));
    assert!(dom.contains("fails from 1536–3072 tokens"));
    assert_eq!(dom.matches("class=\"example\"").count(), 200);
    // The first table is narrow; each compressed cell's Δ and CI on hover.
    let compact = &dom[dom.find("id=\"compact\"").unwrap()..dom.find("id=\"summary\"").unwrap()];
    assert!(compact.contains("title=\"Δ "), "{compact}");
    assert!(!compact.contains(">1.00 (Δ"), "{compact}");

    // A filter from the address: streaming's abstentions only.
    let dom = browse(
        profile.path(),
        &format!("{url}#policy=streaming&failure=ABSTAINED"),
        &["--dump-dom"],
    );
    let (shown, total) = showing(&dom);
    assert_eq!(total, 200);
    assert!(shown > 0 && shown < 200, "{shown}");
    assert!(dom.contains("ABSTAINED"));
    let examples = &dom[dom.find("id=\"examples\"").unwrap()..];
    assert!(examples.contains("<td>streaming @ 0.5</td>"));
    assert!(
        !examples.contains("<td>snapkv @ 0.5</td>"),
        "the policy filter applies"
    );
    // An example view: its id, gold answer and each cell's answer.
    let ex = dom.find("data-example=\"").unwrap();
    let id: String = dom[ex + 14..].chars().take_while(|c| *c != '"').collect();
    assert!(html.contains(&id));
    assert!(dom.contains("gold: "));

    // A screenshot of the page as a reader sees it.
    let shot = p.path("runs/demo/report.png");
    browse(
        profile.path(),
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,1800",
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    if let Ok(dir) = std::env::var("KVT_SCREENSHOT_DIR") {
        std::fs::copy(&shot, std::path::Path::new(&dir).join("report_html.png")).unwrap();
    }
}
