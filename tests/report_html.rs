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
    // Issue #29, item 3: everything report.md has. The table with CIs …
    let ci = &dom[dom.find("id=\"ci-table\"").expect("the CI table")..];
    let ci = &ci[..ci.find("</table>").unwrap()];
    assert!(ci.contains("<th>mean [95% CI]</th>"), "{ci}");
    assert!(ci.contains("<th>Δ vs full [95% CI]</th>"), "{ci}");
    assert!(ci.contains("<td>streaming @ 0.5</td>"), "{ci}");
    // (each compressed row carries a Δ with its interval)
    assert!(ci.matches(", ").count() >= 5 * 6, "{ci}");
    // … the plots, inline SVGs …
    for name in [
        "acc_by_bin",
        "fail_by_bin",
        "latency_p50_by_bin",
        "delta_heatmap",
    ] {
        let at = dom
            .find(&format!("id=\"plot-{name}\""))
            .unwrap_or_else(|| panic!("plot {name} inline"));
        assert!(dom[at..at + 200].contains("<svg"), "{name}");
    }
    // … the failures, and every column defined on the page.
    let failures = &dom[dom.find("id=\"failures\"").unwrap()..];
    assert!(failures[..failures.find("</table>").unwrap()].contains("ABSTAINED"));
    for term in [
        "instability</dt>",
        "loss (bound)</dt>",
        "KV memory</dt>",
        "<b>KV kept</b>",
    ] {
        assert!(dom.contains(term), "{term} is defined");
    }
    // The needle is visible in a synthetic example's excerpt: the excerpt
    // marks a gold answer, the very text of the example's gold line.
    let first = &dom[dom.find("class=\"example\"").unwrap()..];
    let first = &first[..first[1..].find("class=\"example\"").unwrap()];
    let gold = &first[first.find("gold: ").unwrap() + 6..];
    let gold = &gold[..gold.find('<').unwrap()];
    let mark = &first[first
        .find("<mark class=\"gold\"")
        .expect("the needle is marked")..];
    let mark = &mark[mark.find('>').unwrap() + 1..mark.find("</mark>").unwrap()];
    assert!(
        gold.split(" | ").any(|g| g.eq_ignore_ascii_case(mark)),
        "marked `{mark}`, gold `{gold}`"
    );
    assert!(
        dom.matches("<mark class=\"gold\"").count() >= 190,
        "nearly every synthetic example's needle is in its excerpt"
    );
    assert!(
        first.contains("whole context ("),
        "the context is one click away"
    );

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
