//! `kvt serve` as a child process: started on a free loopback port for one
//! node (the simulator), or once per process and model file (the native
//! engine, so prefills are shared between cells), health-checked, and stopped
//! with kvt — it watches its standard input and exits when kvt does.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `kvt serve` started for one node: a free loopback port, health-checked,
/// stopped (and reaped) on drop. It also exits if this process dies, because
/// it watches its standard input.
pub struct SpawnedServer {
    child: Child,
    pub url: String,
}

impl SpawnedServer {
    pub fn start(model: &str, model_file: Option<&std::path::Path>) -> Result<SpawnedServer> {
        let exe = std::env::current_exe().context("locating the kvt binary")?;
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model",
                model,
            ])
            .args(
                model_file
                    .map(|f| vec![std::ffi::OsString::from("--model-file"), f.into()])
                    .unwrap_or_default(),
            )
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting `kvt serve`")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = SpawnedServer {
            child,
            url: String::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("`kvt serve` did not report its address within 30 s"))?;
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|a| a.starts_with("http://"))
            .ok_or_else(|| {
                anyhow!(
                    "`kvt serve` printed `{}` instead of its address",
                    line.trim()
                )
            })?;
        server.url = format!("{addr}/v1");
        Ok(server)
    }
}

/// `kvt serve --model-file` started once per process and model file; it exits
/// with this process (it watches its standard input).
pub fn shared_model_server(model: &str, file: &std::path::Path) -> Result<String> {
    static SERVERS: OnceLock<Mutex<BTreeMap<std::path::PathBuf, SpawnedServer>>> = OnceLock::new();
    let mut m = SERVERS
        .get_or_init(Default::default)
        .lock()
        .expect("servers");
    if let Some(srv) = m.get_mut(file) {
        if matches!(srv.child.try_wait(), Ok(None)) {
            return Ok(srv.url.clone());
        }
    }
    let srv = SpawnedServer::start(model, Some(file))?;
    let url = srv.url.clone();
    m.insert(file.to_path_buf(), srv);
    Ok(url)
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_healthy(base: &str) -> Result<()> {
    let url = format!("{}/health", base.trim_end_matches("/v1"));
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http.get(&url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the server at {url} did not become healthy within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
