//! The launcher: starts an inference server for one `infer` node from a
//! command template, on a free loopback port, waits for its health check, keeps
//! its output in the run's logs, and stops its whole process group when the
//! node ends — on success, on failure, on Ctrl-C (even a second one), and,
//! through a supervisor process that outlives kvt, if kvt itself is killed.
//!
//! Template variables: `{port}`, `{model}`, `{policy}`, `{budget}`, and any
//! per-budget (or per-quantisation) variable from `engine.launch.vars` (e.g. `{cache_type}` for
//! llama.cpp's `-ctk {cache_type} -ctv {cache_type}`).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Process groups of every server this process started and has not stopped.
fn live() -> &'static Mutex<Vec<i32>> {
    static L: OnceLock<Mutex<Vec<i32>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

/// Kills every launched server now (used before exiting on a second Ctrl-C).
pub fn kill_all() {
    if let Ok(l) = live().lock() {
        for &pg in l.iter() {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
            unsafe {
                libc::kill(-pg, libc::SIGKILL);
            }
        }
    }
}

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Fills `{name}` placeholders; an unknown one is an error naming it.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        let end = tail
            .find('}')
            .ok_or_else(|| anyhow!("`engine.launch.command`: unclosed `{{` in `{template}`"))?;
        let name = &tail[..end];
        let v = vars.get(name).ok_or_else(|| {
            anyhow!(
                "`engine.launch.command` uses `{{{name}}}`, which is not defined; known: {}",
                vars.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        out.push_str(v);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// What `sh -c` runs for a launch command: `exec` for a simple command
/// (`exec env K=V cmd …` when it starts with assignments), the command as
/// written otherwise.
pub fn shell_script(command: &str) -> String {
    let simple = !command.contains(['&', ';', '|', '\n', '(', '`', '<', '>']);
    if !simple {
        return command.to_string();
    }
    let first = command.split_whitespace().next().unwrap_or("");
    let assigns = first.split_once('=').is_some_and(|(n, _)| {
        !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if assigns {
        format!("exec env {command}")
    } else {
        format!("exec {command}")
    }
}

/// Every live descendant of `pid` (children, their children, …), from the
/// parent links in `/proc/*/stat`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|v| v.parse().ok()) {
                children.entry(ppid).or_default().push(child);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

/// Sends `sig` to the process group `pgid` and to every descendant of this
/// process (those that left the group: `setsid`, daemons).
fn signal_all(pgid: i32, sig: i32) {
    // SAFETY: kill(2) on the process group this process created and on its
    // own descendants; no memory is touched.
    unsafe {
        libc::kill(-pgid, sig);
        for d in descendants(std::process::id() as i32) {
            libc::kill(d, sig);
        }
    }
}

/// `kvt launch-supervisor --log LOG -- SCRIPT`: runs `sh -c SCRIPT` in a new
/// process group with its output appended to LOG, prints the group id on
/// stdout, then waits. It is a child subreaper (`PR_SET_CHILD_SUBREAPER`):
/// a server that detaches (`setsid`, a daemonising fork) is re-parented to
/// it, not to init, so it stays tracked. It exits when the last process it
/// started has exited, with the shell's status; when its standard input
/// closes (kvt is gone, or stops the server) it stops the group and every
/// descendant — SIGTERM, then SIGKILL after 3 s — and exits.
pub fn supervise(log: &Path, script: &str) -> Result<i32> {
    use std::io::{Read, Write};
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the server log {}", log.display()))?;
    let err = out.try_clone()?;
    // SAFETY: prctl(2) with an integer argument; affects only this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    // Writes to kvt ignore errors: if kvt is already gone (killed right after
    // starting us), the server must still be stopped, not left behind by a
    // panic on a closed pipe.
    let mut stdout = std::io::stdout();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(stdout, "cannot run sh: {e}");
            return Ok(1);
        }
    };
    let pgid = child.id() as i32;
    let _ = writeln!(stdout, "{pgid}");
    let _ = stdout.flush();
    let (tx, rx) = std::sync::mpsc::channel::<Option<i32>>();
    let eof = tx.clone();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = eof.send(None);
    });
    std::thread::spawn(move || {
        // Reap every child, re-parented ones included, until none is left.
        let mut code = None;
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) writes only the status integer it is given.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break;
            }
            if pid == pgid {
                code = Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    1
                });
            }
        }
        let _ = tx.send(Some(code.unwrap_or(1)));
    });
    match rx.recv() {
        // Everything it started has exited: the supervisor follows with the
        // shell's code.
        Ok(Some(code)) => Ok(code),
        // kvt closed the pipe (or died): stop the group and every descendant.
        _ => {
            signal_all(pgid, libc::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3)
                && !descendants(std::process::id() as i32).is_empty()
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Reaches processes that ignored SIGTERM.
            signal_all(pgid, libc::SIGKILL);
            Ok(0)
        }
    }
}

/// A running server; stopped (whole process group) on drop.
pub struct Launched {
    /// The supervisor (`kvt launch-supervisor`); it exits with the server.
    child: Child,
    /// Its standard input: closing it (dropping it, or kvt dying) stops the server.
    _pipe: Option<std::process::ChildStdin>,
    /// The server's process group (and the pid of its shell, or of the
    /// server itself for a simple command, which `exec`s).
    pgid: i32,
    /// Whether `pgid` is a shell that runs the server (a compound command),
    /// not the server: its memory is not the server's.
    shell_stays: bool,
    pub base_url: String,
    pub log: std::path::PathBuf,
}

impl Launched {
    /// Starts `command` (run by `sh -c`) in its own process group with its
    /// output appended to `log`.
    pub fn start(
        command: &str,
        cwd: &Path,
        port: u16,
        api_path: &str,
        log: &Path,
    ) -> Result<Launched> {
        if let Some(d) = log.parent() {
            std::fs::create_dir_all(d)?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the server log {}", log.display()))?;
        drop(out);
        // A supervisor (this same binary, `kvt launch-supervisor`) starts the
        // command in its own process group and then waits on a pipe only this
        // process holds open. When the pipe closes — kvt exited, or was killed
        // with -9, which no signal handler sees — it stops the server's whole
        // group, however many processes a compound command started. It exists
        // before the server does, so there is no moment when a server runs
        // without someone to stop it.
        let exe = std::env::current_exe().context("locating the kvt binary")?;
        let mut child = Command::new(exe)
            .arg("launch-supervisor")
            .arg("--log")
            .arg(log)
            .arg("--")
            .arg(shell_script(command))
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting `{}`", crate::redact::text(command)))?;
        let pipe = child.stdin.take();
        let mut line = String::new();
        {
            use std::io::BufRead;
            let stdout = child.stdout.take().expect("piped");
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .context("reading the launched server's process group")?;
        }
        let pgid: i32 = line.trim().parse().map_err(|_| {
            anyhow!(
                "the launcher could not start `{}`: {}",
                crate::redact::text(command),
                line.trim()
            )
        })?;
        live().lock().expect("launcher registry").push(pgid);
        Ok(Launched {
            child,
            _pipe: pipe,
            pgid,
            shell_stays: !shell_script(command).starts_with("exec "),
            base_url: format!("http://127.0.0.1:{port}{api_path}"),
            log: log.to_path_buf(),
        })
    }

    /// Polls `health_url` until it answers 2xx, the process exits, or `timeout`.
    pub fn wait_healthy(&mut self, health_url: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the launched server exited ({status}) before it was healthy; its output is in {}",
                    self.log.display()
                );
            }
            let ok = rt.block_on(async {
                http.get(health_url)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            });
            if ok {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "the launched server did not answer {health_url} within {} s (`engine.launch.startup_timeout_s`); its output is in {}",
                    timeout.as_secs(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Peak and current resident memory of the server (KiB), from /proc:
    /// the sum over every process the supervisor tracks (a detached server
    /// and a server's workers included), less the shell of a compound
    /// command. The peak is the sum of each process's own peak.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let field = |status: &str, name: &str| -> Option<u64> {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        let mut total: Option<(u64, u64)> = None;
        for pid in descendants(self.child.id() as i32) {
            if self.shell_stays && pid == self.pgid {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            if let (Some(hwm), Some(rss)) = (field(&status, "VmHWM:"), field(&status, "VmRSS:")) {
                let t = total.get_or_insert((0, 0));
                t.0 += hwm;
                t.1 += rss;
            }
        }
        total
    }

    /// Stops the server: the supervisor, once its pipe closes, signals the
    /// group and every descendant (SIGTERM, then SIGKILL after 3 s). Should
    /// the supervisor not finish, the group is killed from here.
    pub fn stop(&mut self) {
        self._pipe = None;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(6) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signals a process group this process created.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(mut l) = live().lock() {
            l.retain(|&p| p != self.pgid);
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_commands_replace_the_shell_and_compound_ones_keep_it() {
        assert_eq!(shell_script("vllm serve m"), "exec vllm serve m");
        assert_eq!(
            shell_script("HF_TOKEN=x vllm serve m"),
            "exec env HF_TOKEN=x vllm serve m"
        );
        assert_eq!(shell_script("cd d && vllm serve"), "cd d && vllm serve");
        assert_eq!(
            crate::redact::text("HF_TOKEN=abc vllm --x=1"),
            "HF_TOKEN=*** vllm --x=1"
        );
    }

    #[test]
    fn templates_fill_known_variables_and_name_unknown_ones() {
        let vars: BTreeMap<String, String> = [("port", "8081"), ("cache_type", "q8_0")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            render("srv --port {port} -ctk {cache_type}", &vars).unwrap(),
            "srv --port 8081 -ctk q8_0"
        );
        let e = render("srv {nope}", &vars).unwrap_err().to_string();
        assert!(e.contains("{nope}") && e.contains("cache_type"), "{e}");
        assert!(render("srv {port", &vars).is_err());
    }
}
