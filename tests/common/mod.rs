//! A throwaway kvt project in a temp dir, driven through the real binaries.
#![allow(dead_code)]

use assert_cmd::Command;
use std::path::{Path, PathBuf};

/// A binary of the workspace beside this test's own: tests run from
/// `target/<profile>/deps/`, binaries are built into `target/<profile>/`.
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` at the workspace root builds it (with `-p`, build it first: `cargo build -p {name}`)",
        bin.display()
    );
    bin
}

/// The repository's root (these helpers serve the root crate's tests and
/// the `kvt-testops` crate's).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|a| a.join("config/default.yaml").exists())
        .expect("the repository root")
}

/// The `kvt` binary (Cargo names it for the root crate's own tests).
pub fn kvt_bin() -> PathBuf {
    option_env!("CARGO_BIN_EXE_kvt").map_or_else(|| workspace_bin("kvt"), PathBuf::from)
}

/// The test-ops binary (the `kvt-testops` crate: kvt plus the `t_*` ops).
pub fn testops_bin() -> PathBuf {
    option_env!("CARGO_BIN_EXE_kvt-testops")
        .map_or_else(|| workspace_bin("kvt-testops"), PathBuf::from)
}

pub const TEST_PIPELINE: &str = "\
stages:
  read: {op: t_read, uses: [dataset.path]}
  scale: {op: t_scale, needs: [read], uses: [model.name], foreach: {budget: kv.budgets}}
  count: {op: t_count, needs: [scale], uses: [analysis.bootstrap.iters]}
  report: {op: t_report, needs: [count], uses: [output.exp_group_id]}
";

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// A project with the repository's defaults, the test pipeline and one experiment.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = Project { dir };
        let repo = repo_root();
        p.write(
            "config/default.yaml",
            &std::fs::read_to_string(repo.join("config/default.yaml")).unwrap(),
        );
        p.write("pipelines/test.yaml", TEST_PIPELINE);
        p.write(
            "config/experiments/t.yaml",
            "pipeline: test\ndataset:\n  path: input.txt\nmodel:\n  name: lower\nanalysis:\n  bootstrap:\n    iters: 1000\noutput:\n  exp_group_id: t1\n",
        );
        p.write(
            "input.txt",
            "the quick brown fox jumps over the lazy dog again and again\n",
        );
        p
    }

    /// Copies files from the repository into the project, same relative paths.
    pub fn copy_from_repo(&self, files: &[&str]) {
        let repo = repo_root();
        for f in files {
            self.write(f, &std::fs::read_to_string(repo.join(f)).unwrap());
        }
    }

    /// Processes running with this project, or a directory inside it, as
    /// their working directory: the servers a build here launched (the
    /// launcher starts them in the project root; a `cd sub && …` command moves
    /// them below it), found by where they run, not by their name.
    pub fn processes_here(&self) -> Vec<u32> {
        let root = self.root().canonicalize().unwrap();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(&root))
            })
            .collect()
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    /// The directories `data/processed/<name>__<task>-<8 hex>` (one per
    /// distinct preparation of that dataset), newest first.
    pub fn manifest_dirs(&self, name_task: &str) -> Vec<String> {
        let dir = self.path("data/processed");
        let mut found: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                let hex = n.strip_prefix(name_task)?.strip_prefix('-')?;
                (hex.len() == 8).then_some(())?;
                let m = std::fs::metadata(e.path().join("manifest.json")).ok()?;
                Some((m.modified().ok()?, n))
            })
            .collect();
        found.sort();
        found.into_iter().rev().map(|(_, n)| n).collect()
    }

    /// The most recently exported manifest of dataset `<name>__<task>`.
    pub fn manifest(&self, name_task: &str) -> String {
        let dirs = self.manifest_dirs(name_task);
        assert!(!dirs.is_empty(), "no manifest for {name_task}");
        self.read(&format!("data/processed/{}/manifest.json", dirs[0]))
    }

    /// The test-ops binary (kvt plus the `t_*` ops), run in the project root.
    pub fn testops(&self) -> Command {
        let mut c = Command::new(testops_bin());
        c.current_dir(self.root())
            .env_remove("KVT_LOG")
            .env_remove("KVT_CACHE_DIR")
            .env_remove("KVT_REMOTE");
        c
    }

    /// The real `kvt` binary, run in the project root.
    pub fn kvt(&self) -> Command {
        let mut c = Command::new(kvt_bin());
        c.current_dir(self.root())
            .env_remove("KVT_LOG")
            .env_remove("KVT_CACHE_DIR")
            .env_remove("KVT_REMOTE");
        c
    }

    /// Runs `build` with extra args; returns the nodes the ops log says ran, sorted.
    pub fn build(&self, args: &[&str]) -> Vec<String> {
        let _ = std::fs::remove_file(self.path("oplog.txt"));
        let mut c = self.testops();
        c.args(["build", "-c", "config/experiments/t.yaml"])
            .args(args);
        c.assert().success();
        self.ran()
    }

    /// Nodes recorded in `oplog.txt` since it was last cleared, sorted.
    pub fn ran(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_to_string(self.path("oplog.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// Every object file in the cache.
    pub fn objects(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.path("cache/v1/objects")) else {
            return out;
        };
        for d in dirs.flatten() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
        out.sort();
        out
    }
}

pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Nodes a `kvt build` reported as built, sorted (from its stderr).
pub fn built_nodes(out: &std::process::Output) -> Vec<String> {
    let mut v: Vec<String> = stderr_of(out)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("built "))
        .map(|l| l.rsplit_once(" (").map_or(l, |(n, _)| n).to_string())
        .collect();
    v.sort();
    v
}

/// A plain HTTP/1.1 exchange on loopback: returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with(addr, method, path, body, &[])
}

/// [`http`] with extra header lines (`"Authorization: Bearer k"`).
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[&str],
) -> (u16, String) {
    use std::io::{Read, Write};
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let host = addr.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text[9..12].parse().unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // De-chunk.
        let mut out = String::new();
        let mut r = rest;
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, body)
}

/// `kvt serve` on a free port, killed on drop.
pub struct Served {
    pub child: std::process::Child,
    pub addr: String,
}

impl Served {
    pub fn start(args: &[&str]) -> Served {
        Served::start_bin(kvt_bin().to_str().unwrap(), args)
    }

    /// `kvt serve` from another binary (an earlier build, for regressions).
    pub fn start_bin(bin: &str, args: &[&str]) -> Served {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(addr.starts_with("http://127.0.0.1:"), "{line}");
        Served { child, addr }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `app` on a free loopback port from a runtime of its own (two
/// worker threads); returns `http://127.0.0.1:PORT` and the runtime, which
/// stops the server when dropped.
pub fn serve_router(app: axum::Router) -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rt)
}

/// No file under `root` (caches, runs, logs) holds `secret`; returns how many
/// files were searched.
pub fn assert_secret_nowhere(root: &Path, secret: &str) -> usize {
    let mut files = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files += 1;
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{} holds the secret",
                    path.display()
                );
            }
        }
    }
    files
}

/// A prompt of roughly `words` words with one fact in it, varied by `i`.
#[allow(dead_code)]
pub fn agreement_prompt(i: usize, words: usize) -> (String, String) {
    const NAMES: &[&str] = &["Velo", "Marn", "Tessa", "Quill", "Orsk", "Bramble", "Ithen"];
    const THINGS: &[&str] = &[
        "access code",
        "locker number",
        "room number",
        "ticket number",
    ];
    const FILLER: &[&str] = &[
        "The ferry crossed the estuary twice an hour, carrying bicycles and crates.",
        "A retired surveyor kept a notebook of every bridge he had crossed.",
        "In late autumn the orchard smelled of wet leaves and forgotten apples.",
        "The library's reading room was quiet except for the ticking radiator.",
        "Fog settled in the valley overnight and lifted by noon.",
    ];
    let name = NAMES[i % NAMES.len()];
    let thing = THINGS[i % THINGS.len()];
    let value = 104_729 * (i + 3) % 900_000 + 100_000;
    let mut body = Vec::new();
    let mut n = 0;
    let mut k = i;
    while n < words {
        let s = FILLER[k % FILLER.len()];
        n += s.split_whitespace().count();
        body.push(s.to_string());
        k += 2;
    }
    let at = (i * 7) % body.len().max(1);
    body.insert(at, format!("The {thing} assigned to {name} is {value}."));
    let prompt = format!(
        "Here is a document.\n\n{}\n\nQuestion: What is the {thing} assigned to {name}?\nAnswer:",
        body.join(" ")
    );
    (prompt, value.to_string())
}

/// POSTs a chat completion and returns the reply's JSON (asserting 200).
#[allow(dead_code)]
pub fn post_chat(addr: &str, body: &serde_json::Value) -> serde_json::Value {
    let (st, text) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
    );
    assert_eq!(st, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// A `logprobs.content` step's alternatives: (token, logprob), best first.
#[allow(dead_code)]
pub fn step_top(step: &serde_json::Value) -> Vec<(String, f64)> {
    step["top_logprobs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap_or("").to_string(),
                        t["logprob"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[allow(dead_code)]
/// The answer and its per-token (token, logprob, top-1 token) from the
/// standard `logprobs` field.
pub fn chat_with_logprobs(
    addr: &str,
    body: &serde_json::Value,
) -> (String, Vec<(String, f64, String)>) {
    let v = post_chat(addr, body);
    let lps = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap_or("").to_string(),
                        t["logprob"].as_f64().unwrap_or(f64::NAN),
                        t["top_logprobs"][0]["token"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        lps,
    )
}

/// A Python server script of the repository (`scripts/…`) on a free loopback
/// port, started by this test and killed (by its own handle) when dropped.
#[allow(dead_code)]
pub struct PyServer {
    child: std::process::Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub pid: u32,
}

#[allow(dead_code)]
impl PyServer {
    /// Starts `python scripts/<script> --port P <args>` and returns once it
    /// has printed its readiness line (`… listening on …`, written once the
    /// model is loaded and the port bound) and `/health` answers 200; panics
    /// if it exits first or takes over `limit_s`.
    pub fn start(python: &str, script: &str, args: &[&str], limit_s: u64) -> PyServer {
        use std::io::BufRead;
        let repo = repo_root();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new(python)
            .arg(repo.join("scripts").join(script))
            .args(["--port", &port.to_string()])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") {
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(std::time::Duration::from_secs(limit_s)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{script} exited before it was ready")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("{script} did not start within {limit_s} s")
            }
        }
        let addr = format!("127.0.0.1:{port}");
        assert_eq!(http(&addr, "GET", "/health", None).0, 200, "{script}");
        let pid = child.id();
        PyServer { child, addr, pid }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The files in a `kvt bundle` archive (tar, zstd), by name.
#[allow(dead_code)]
pub fn bundle_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let dec = zstd::Decoder::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut tar = tar::Archive::new(dec);
    let mut out = Vec::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().to_string();
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        out.push((name, b));
    }
    out
}

/// Waits until `cond` holds: checks it every 10 ms, panics naming `what`
/// after 60 s. The one place tests wait on another process's state that no
/// pipe or channel announces — a row it commits, a file it writes, a child it
/// starts or a request it sends: the wait ends on that state itself, never
/// after a fixed time, so a slow machine only makes it longer. (A readiness
/// line on a pipe, where a process prints one, is read instead: see
/// `Served::start`.)
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "waited 60 s for {what}"
        );
        // No signal exists for this state (see above): poll it, briefly.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
