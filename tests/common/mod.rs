//! A throwaway kvt project in a temp dir, driven through the real binaries.
#![allow(dead_code)]

use assert_cmd::Command;
use std::path::{Path, PathBuf};

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
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        p.write(
            "config/default.yaml",
            &std::fs::read_to_string(repo.join("config/default.yaml")).unwrap(),
        );
        p.write("pipelines/test.yaml", TEST_PIPELINE);
        p.write(
            "config/experiments/t.yaml",
            "pipeline: test\ndataset:\n  path: input.txt\nmodel:\n  name: lower\noutput:\n  exp_group_id: t1\n",
        );
        p.write(
            "input.txt",
            "the quick brown fox jumps over the lazy dog again and again\n",
        );
        p
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

    /// The test-ops binary (kvt plus the `t_*` ops), run in the project root.
    pub fn testops(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvt-testops"));
        c.current_dir(self.root())
            .env_remove("KVT_LOG")
            .env_remove("KVT_CACHE_DIR");
        c
    }

    /// The real `kvt` binary, run in the project root.
    pub fn kvt(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvt"));
        c.current_dir(self.root())
            .env_remove("KVT_LOG")
            .env_remove("KVT_CACHE_DIR");
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
