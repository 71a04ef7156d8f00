//! Config layering and validation through the real binary: every error exits 2
//! and names the file and the dotted key.

mod common;
use common::*;

fn validate(p: &Project, file: &str, extra: &[&str]) -> std::process::Output {
    p.testops()
        .args(["validate", "-c", file])
        .args(extra)
        .output()
        .unwrap()
}

/// Each `(yaml, key, says)` as a test experiment: `kvt validate` exits 2
/// naming the file, the key and what is wrong.
fn expect_key_errors(p: &Project, cases: &[(&str, &str, &str)]) {
    for (yaml, key, says) in cases {
        p.write(
            "config/experiments/bad.yaml",
            &format!("pipeline: test\noutput: {{exp_group_id: b}}\n{yaml}\n"),
        );
        let out = validate(p, "config/experiments/bad.yaml", &[]);
        expect_usage_error(
            &out,
            &["config/experiments/bad.yaml", &format!("`{key}`"), says],
        );
    }
}

fn expect_usage_error(out: &std::process::Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr_of(out));
    let err = stderr_of(out);
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
}

#[test]
fn a_valid_config_validates() {
    let p = Project::new();
    let out = validate(&p, "config/experiments/t.yaml", &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("is valid"));
}

#[test]
fn unknown_key_names_file_line_path_and_suggests() {
    let p = Project::new();
    p.write(
        "config/experiments/bad.yaml",
        "pipeline: test\nanalysis:\n  bootstrp:\n    iters: 5\noutput:\n  exp_group_id: x\n",
    );
    let out = validate(&p, "config/experiments/bad.yaml", &[]);
    expect_usage_error(
        &out,
        &[
            "config/experiments/bad.yaml:3",
            "`analysis.bootstrp`",
            "did you mean `analysis.bootstrap`",
        ],
    );
}

#[test]
fn wrong_type_names_key_and_expected_type() {
    let p = Project::new();
    p.write(
        "config/experiments/bad.yaml",
        "pipeline: test\nanalysis:\n  bootstrap:\n    iters: lots\noutput:\n  exp_group_id: x\n",
    );
    let out = validate(&p, "config/experiments/bad.yaml", &[]);
    expect_usage_error(
        &out,
        &[
            "config/experiments/bad.yaml:4",
            "`analysis.bootstrap.iters`",
            "expected u32",
            "\"lots\"",
        ],
    );
}

#[test]
fn missing_required_value_names_file_and_key() {
    let p = Project::new();
    p.write("config/experiments/bad.yaml", "pipeline: test\n");
    let out = validate(&p, "config/experiments/bad.yaml", &[]);
    expect_usage_error(
        &out,
        &[
            "config/experiments/bad.yaml",
            "missing required key `output.exp_group_id`",
        ],
    );
}

#[test]
fn unsafe_exp_group_ids_are_rejected() {
    let p = Project::new();
    for bad in ["../x", "a/b", "''", ".."] {
        p.write(
            "config/experiments/bad.yaml",
            &format!("pipeline: test\noutput:\n  exp_group_id: {bad}\n"),
        );
        let out = validate(&p, "config/experiments/bad.yaml", &[]);
        expect_usage_error(
            &out,
            &[
                "config/experiments/bad.yaml",
                "`output.exp_group_id`",
                "safe single path component",
            ],
        );
    }
}

#[test]
fn yaml_syntax_errors_name_the_file() {
    let p = Project::new();
    p.write("config/experiments/bad.yaml", "pipeline: test\noutput: [\n");
    let out = validate(&p, "config/experiments/bad.yaml", &[]);
    expect_usage_error(&out, &["config/experiments/bad.yaml", "not valid YAML"]);
}

#[test]
fn duplicate_keys_are_rejected() {
    let p = Project::new();
    p.write(
        "config/experiments/bad.yaml",
        "pipeline: test\noutput:\n  exp_group_id: a\n  exp_group_id: b\n",
    );
    let out = validate(&p, "config/experiments/bad.yaml", &[]);
    expect_usage_error(&out, &["config/experiments/bad.yaml"]);
}

#[test]
fn missing_config_file_is_a_usage_error() {
    let p = Project::new();
    let out = validate(&p, "config/experiments/nope.yaml", &[]);
    expect_usage_error(
        &out,
        &["cannot read config file `config/experiments/nope.yaml`"],
    );
}

#[test]
fn set_overrides_are_typed_and_checked() {
    let p = Project::new();
    let out = p
        .testops()
        .args([
            "resolve",
            "-c",
            "config/experiments/t.yaml",
            "--print-config",
            "--set",
            "kv.budgets=[1.0, 0.25]",
            "--set",
            "engine.concurrency=3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let s = stdout_of(&out);
    assert!(s.contains("- 0.25") && s.contains("concurrency: 3"), "{s}");
    expect_usage_error(
        &validate(&p, "config/experiments/t.yaml", &["--set", "kv.budgetz=1"]),
        &["`--set kv.budgetz=1`", "did you mean `kv.budgets`"],
    );
    expect_usage_error(
        &validate(
            &p,
            "config/experiments/t.yaml",
            &["--set", "engine.concurrency=many"],
        ),
        &["`--set engine.concurrency=many`", "`engine.concurrency`"],
    );
    expect_usage_error(
        &validate(&p, "config/experiments/t.yaml", &["--set", "nodots"]),
        &["`--set nodots`", "key.path=value"],
    );
    expect_usage_error(
        &validate(
            &p,
            "config/experiments/t.yaml",
            &["--set", "kv.budgets=[0.5, 0]"],
        ),
        &["`kv.budgets`", "must be > 0"],
    );
}

#[test]
fn environment_variables_and_dotenv_are_resolved() {
    let p = Project::new();
    p.write(
        "config/experiments/env.yaml",
        "pipeline: test\nengine:\n  base_url: ${KVT_TEST_URL}\n  concurrency: ${KVT_TEST_CONC:-5}\n  label: run-${KVT_TEST_LABEL:-plain}\noutput:\n  exp_group_id: env\n",
    );
    // Unset and no default: a usage error naming the file, line, key and variable.
    let out = validate(&p, "config/experiments/env.yaml", &[]);
    expect_usage_error(
        &out,
        &[
            "config/experiments/env.yaml:3",
            "`engine.base_url`",
            "`KVT_TEST_URL`",
        ],
    );
    // From a .env beside the config; defaults typed as YAML (5 is a number).
    p.write(
        "config/experiments/.env",
        "# local settings\nKVT_TEST_URL=http://127.0.0.1:9/v1\n",
    );
    let out = p
        .testops()
        .args([
            "resolve",
            "-c",
            "config/experiments/env.yaml",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let s = stdout_of(&out);
    assert!(
        s.contains("base_url: http://127.0.0.1:9/v1")
            && s.contains("concurrency: 5")
            && s.contains("label: run-plain"),
        "{s}"
    );
    // The process environment wins over .env.
    let out = p
        .testops()
        .env("KVT_TEST_URL", "http://127.0.0.1:10/v1")
        .env("KVT_TEST_CONC", "7")
        .args([
            "resolve",
            "-c",
            "config/experiments/env.yaml",
            "--print-config",
        ])
        .output()
        .unwrap();
    let s = stdout_of(&out);
    assert!(
        s.contains("base_url: http://127.0.0.1:10/v1") && s.contains("concurrency: 7"),
        "{s}"
    );
    // Quotes and `export` as shells write them; a malformed line names file:line.
    p.write(
        "config/experiments/.env",
        "export KVT_TEST_URL=\"http://127.0.0.1:11/v1\"\n",
    );
    let out = p
        .testops()
        .args([
            "resolve",
            "-c",
            "config/experiments/env.yaml",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert!(
        stdout_of(&out).contains("base_url: http://127.0.0.1:11/v1"),
        "{}{}",
        stdout_of(&out),
        stderr_of(&out)
    );
    p.write(
        "config/experiments/.env",
        "KVT_TEST_URL=http://127.0.0.1:9/v1\nthis line is not an assignment\n",
    );
    let out = validate(&p, "config/experiments/env.yaml", &[]);
    expect_usage_error(&out, &["config/experiments/.env:2"]);
}

#[test]
fn resolve_prints_paths_and_redacts_secrets() {
    let p = Project::new();
    let out = p
        .testops()
        .args([
            "resolve",
            "-c",
            "config/experiments/t.yaml",
            "--print-config",
            "--set",
            "engine.extra_body.api_key=sk-SENTINEL",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let s = stdout_of(&out);
    assert!(s.contains("run_dir: runs/t1"));
    assert!(s.contains("sqlite: runs/t1/kv_transition.sqlite"));
    assert!(s.contains("dataset_id: synthetic__needle"));
    assert!(
        s.contains("api_key: '***'")
            || s.contains("api_key: \"***\"")
            || s.contains("api_key: ***"),
        "{s}"
    );
    assert!(!s.contains("sk-SENTINEL"));
}

fn pipeline_error(p: &Project, pipeline: &str, needles: &[&str]) {
    p.write("pipelines/test.yaml", pipeline);
    let out = p
        .testops()
        .args(["build", "-c", "config/experiments/t.yaml"])
        .output()
        .unwrap();
    expect_usage_error(&out, needles);
}

#[test]
fn pipeline_errors_are_usage_errors() {
    let p = Project::new();
    pipeline_error(
        &p,
        "stages:\n  a: {op: nope}\n",
        &["pipelines/test.yaml", "unknown op `nope`"],
    );
    pipeline_error(&p, "stages:\n  a: {op: t_read, uses: [dataset.path], needs: [raed]}\n  read: {op: t_read, uses: [dataset.path]}\n", &["needs unknown stage `raed`", "did you mean `read`"]);
    pipeline_error(
        &p,
        "stages:\n  a: {op: t_read, needs: [b], uses: [dataset.path]}\n  b: {op: t_read, needs: [a], uses: [dataset.path]}\n",
        &["cycle", "a → b → a"],
    );
    pipeline_error(
        &p,
        "stages:\n  a: {op: t_read, uses: [dataset.pathh]}\n",
        &["`dataset.pathh`", "not in the config schema"],
    );
    pipeline_error(
        &p,
        "stages:\n  a: {op: t_read, uses: [dataset.path], foreach: {x: model.name}}\n",
        &["needs a list at `model.name`"],
    );
    pipeline_error(
        &p,
        "stages:\n  a: {op: t_read, usess: [dataset.path]}\n",
        &["pipelines/test.yaml", "usess"],
    );
    p.write("pipelines/test.yaml", TEST_PIPELINE);
    let out = p
        .testops()
        .args(["build", "nope", "-c", "config/experiments/t.yaml"])
        .output()
        .unwrap();
    expect_usage_error(&out, &["unknown target `nope`"]);
    let out = p
        .testops()
        .args([
            "build",
            "-c",
            "config/experiments/t.yaml",
            "--force",
            "nope",
        ])
        .output()
        .unwrap();
    expect_usage_error(&out, &["`--force nope`"]);
}

#[test]
fn command_line_misuse_exits_2() {
    let p = Project::new();
    let out = p.kvt().args(["build"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = p.kvt().args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = p.kvt().args(["--help"]).output().unwrap();
    assert!(out.status.success());
    let help = stdout_of(&out);
    for cmd in ["build", "prepare", "graph", "validate", "resolve", "cache"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn engine_and_policy_values_are_checked_before_anything_runs() {
    let p = Project::new();
    p.write(
        "config/experiments/bad.yaml",
        "pipeline: test\nkv:\n  policies: [snapkv, streamng]\noutput:\n  exp_group_id: x\n",
    );
    let out = validate(&p, "config/experiments/bad.yaml", &[]);
    expect_usage_error(
        &out,
        &[
            "bad.yaml:3",
            "`kv.policies`",
            "streamng",
            "did you mean `streaming`",
        ],
    );
    let t = "config/experiments/t.yaml";
    for (set, needles) in [
        ("engine.kind=vllm", &["`engine.kind`", "vllm"][..]),
        (
            "engine.kind=openai",
            &["`engine.base_url`", "is required"][..],
        ),
        ("engine.concurrency=0", &["`engine.concurrency`"][..]),
        ("analysis.bootstrap.ci=95", &["`analysis.bootstrap.ci`"][..]),
        ("kv.policies=[]", &["`kv.policies`"][..]),
    ] {
        let out = validate(&p, t, &["--set", set]);
        expect_usage_error(&out, needles);
    }
}

/// Findings from mutated configs (issue: configuration you can trust): each
/// exits 2 before any work, naming the file, the line and the key.
#[test]
fn mutated_configs_exit_2_naming_file_line_and_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "lengths_overflow",
            "dataset:\n  lengths: [18446744073709551615]\n",
            "`dataset.lengths`",
        ),
        (
            "lengths_empty",
            "dataset:\n  lengths: []\n",
            "`dataset.lengths`",
        ),
        (
            "per_length_zero",
            "dataset:\n  per_length: 0\n",
            "`dataset.per_length`",
        ),
        (
            "n_bins_huge",
            "binning:\n  n_bins: 1000000\n",
            "`binning.n_bins`",
        ),
        (
            "n_per_bin_zero",
            "sampling:\n  n_per_bin: 0\n",
            "`sampling.n_per_bin`",
        ),
        (
            "edges_decreasing",
            "binning:\n  edges: [0, 500, 100]\n",
            "`binning.edges`",
        ),
        (
            "template_without_context",
            "prompt:\n  template: \"Question: {question}\"\n",
            "`prompt.template`",
        ),
        (
            "template_unknown_placeholder",
            "prompt:\n  template: \"{context}\\n{question}\\n{options}\"\n",
            "`prompt.template`",
        ),
        (
            "task_template_unknown_placeholder",
            "prompt:\n  tasks:\n    mine:\n      template: \"{context} {title}\"\n      max_new_tokens: 8\n",
            "`prompt.tasks.mine.template`",
        ),
        (
            "extra_field_bad_name",
            "dataset:\n  fields:\n    extra: {\"my-options\": options}\n",
            "`dataset.fields.extra.my-options`",
        ),
        (
            "dataset_name_escapes",
            "dataset:\n  name: ../../../x\n",
            "`dataset.name`",
        ),
        (
            "dataset_path_missing",
            "dataset:\n  path: no/such/file.jsonl\n",
            "`dataset.path`",
        ),
    ];
    let p = Project::new();
    for (name, body, key) in cases {
        let file = format!("config/experiments/{name}.yaml");
        p.write(
            &file,
            &format!("pipeline: test\n{body}model:\n  name: lower\noutput:\n  exp_group_id: x\n"),
        );
        let out = validate(&p, &file, &[]);
        expect_usage_error(&out, &[&format!("{file}:"), key]);
    }
    // A 5,000-character experiment id, and a pipeline name that escapes the project.
    let long = "a".repeat(5000);
    p.write(
        "config/experiments/long.yaml",
        &format!("pipeline: test\noutput:\n  exp_group_id: {long}\n"),
    );
    let out = validate(&p, "config/experiments/long.yaml", &[]);
    expect_usage_error(
        &out,
        &["config/experiments/long.yaml:3", "`output.exp_group_id`"],
    );
    assert!(
        stderr_of(&out).len() < 1000,
        "the error does not echo 5,000 characters"
    );
    p.write(
        "config/experiments/escape.yaml",
        "pipeline: ../../etc/passwd\noutput:\n  exp_group_id: x\n",
    );
    let out = validate(&p, "config/experiments/escape.yaml", &[]);
    expect_usage_error(&out, &["config/experiments/escape.yaml:1", "`pipeline`"]);
    assert!(
        !stderr_of(&out).contains("root:"),
        "no file contents in the error"
    );
}

#[test]
fn a_pipeline_whose_uses_disagree_with_its_op_exits_2_before_any_stage() {
    let p = Project::new();
    p.copy_from_repo(&["pipelines/default.yaml"]);
    let default = p.read("pipelines/default.yaml");
    let from = "uses: [dataset.source, dataset.task, dataset.metric, metrics.code_sim]";
    assert!(default.contains(from), "the default pipeline changed shape");
    p.write(
        "pipelines/mine.yaml",
        &default.replace(
            from,
            "uses: [dataset.source, dataset.task, kv.seed, metrics.code_sim]",
        ),
    );
    p.write(
        "config/experiments/mine.yaml",
        "pipeline: mine\noutput: {exp_group_id: mine}\n",
    );
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/mine.yaml"])
        .output()
        .unwrap();
    expect_usage_error(
        &out,
        &[
            "stage `score`",
            "reads dataset.metric but the list lacks it",
            "kv.seed which the op never reads",
        ],
    );
    assert!(!p.path("cache/v1/objects").exists(), "a stage ran");
}

/// Values whose types hold them but whose ranges do not: each is refused by
/// `kvt validate` with exit 2, the file, the key and what is allowed
/// (#26: `max_response_mib: 0` turned every answer into a final error;
/// `budgets: [1.5]` became a budget of one token; temperature −1, top_p 2
/// and a focus bin that does not exist were accepted silently).
#[test]
fn regression_out_of_range_values_are_refused_by_validate() {
    let p = Project::new();
    expect_key_errors(
        &p,
        &[
            (
                "engine: {max_response_mib: 0}",
                "engine.max_response_mib",
                "at least 1",
            ),
            (
                "kv: {budgets: [1.0, 1.5]}",
                "kv.budgets",
                "not a whole number",
            ),
            (
                "decoding: {temperature: -1}",
                "decoding.temperature",
                "0 (greedy) or more",
            ),
            ("decoding: {top_p: 2}", "decoding.top_p", "(0, 1]"),
            (
                "sampling: {focus_bins: [99]}",
                "sampling.focus_bins",
                "bin 99 does not exist",
            ),
            ("engine: {logprobs: 50}", "engine.logprobs", "more than 20"),
            (
                "analysis: {fidelity: {delta_nats: 0}}",
                "analysis.fidelity.delta_nats",
                "positive",
            ),
            (
                "analysis: {splits: {calibration: 1.0, seed: 0}}",
                "analysis.splits.calibration",
                "[0, 1)",
            ),
            (
                "analysis: {selective: {confidence: mean, confident_risk: 2}}",
                "analysis.selective.confident_risk",
                "[0, 1]",
            ),
        ],
    );
    // A whole token count above 1 and a fraction are both fine.
    p.write(
        "config/experiments/ok.yaml",
        "pipeline: test\noutput: {exp_group_id: b}\nkv: {budgets: [1.0, 0.5, 1024]}\n",
    );
    let out = validate(&p, "config/experiments/ok.yaml", &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
}

/// Issue #29, item 1: quantisation is an axis of its own (`kv.quant`). The
/// old suffix spelling is refused with the new one shown; an unknown
/// quantisation, a repeated entry and a quantised cache on an engine that
/// has none are refused by key; `kvt graph` runs the full cache once per
/// quantisation and never a policy at 1.0.
#[test]
fn kv_quant_is_its_own_axis_and_the_full_cache_runs_once() {
    let p = Project::new();
    expect_key_errors(
        &p,
        &[
            (
                "kv: {policies: [snapkv, full+q8_0]}",
                "kv.policies",
                "write `full` here and `kv.quant: [none, q8_0]`",
            ),
            (
                "kv: {quant: [none, q5_1]}",
                "kv.quant",
                "unknown KV quantisation `q5_1`",
            ),
            ("kv: {quant: []}", "kv.quant", "at least one"),
            (
                "kv: {quant: [none, none]}",
                "kv.quant",
                "lists `none` twice",
            ),
            (
                "kv: {policies: [snapkv, snapkv]}",
                "kv.policies",
                "lists `snapkv` twice",
            ),
            ("kv: {quant: [q8_0]}", "kv.quant", "or on a launched server"),
            (
                "kv: {cells: [{policy: snapkv, budget: 0.5}]}",
                "kv.cells",
                "is derived from `kv.policies`",
            ),
        ],
    );
    p.write(
        "config/experiments/q.yaml",
        "output: {exp_group_id: q}\nkv: {policies: [full, streaming, snapkv], budgets: [1.0, 0.5, 0.2]}\n",
    );
    let out = p
        .kvt()
        .args(["graph", "report", "-c", "config/experiments/q.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    let mut infer: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '─' || c == '│' || c == '└' || c == '├')
        .filter(|w| w.starts_with("infer["))
        .collect();
    infer.sort();
    infer.dedup();
    assert_eq!(
        infer,
        [
            "infer[budget=0.2,policy=snapkv]",
            "infer[budget=0.2,policy=streaming]",
            "infer[budget=0.5,policy=snapkv]",
            "infer[budget=0.5,policy=streaming]",
            "infer[budget=1.0,policy=full]",
        ],
        "{text}"
    );
}

/// Issue #26, finding 6: `db.path` wrote the results database wherever it
/// pointed (an absolute path, `../..`). Now a path outside the project is
/// refused before anything runs (exit 2, naming the key), and nothing is
/// written there.
#[test]
fn regression_db_path_outside_the_project_is_refused() {
    let p = Project::new();
    let outside = tempfile::tempdir().unwrap();
    let abs = outside.path().join("escaped.sqlite");
    p.write(
        "config/experiments/k.yaml",
        "output: {exp_group_id: k}\ndataset: {lengths: [256], per_length: 2}\nbinning: {n_bins: 1}\n\
         sampling: {n_per_bin: 2}\nengine: {kind: reference}\nkv: {policies: [streaming], budgets: [1.0, 0.5]}\n",
    );
    for path in [
        abs.to_str().unwrap(),
        "../escaped.sqlite",
        "runs/../../x.sqlite",
        "",
    ] {
        let set = format!("db.path={path}");
        let out = p
            .kvt()
            .args([
                "build",
                "report",
                "-c",
                "config/experiments/k.yaml",
                "--set",
                &set,
            ])
            .output()
            .unwrap();
        expect_usage_error(&out, &["`db.path`", "outside the project"]);
        assert!(!abs.exists());
        assert!(!p.root().parent().unwrap().join("escaped.sqlite").exists());
        let out = validate(&p, "config/experiments/t.yaml", &["--set", &set]);
        expect_usage_error(&out, &["`db.path`"]);
    }
    // Inside the project, any folder is fine.
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/k.yaml"])
        .args(["--set", "db.path=results/k.sqlite"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(p.path("results/k.sqlite").is_file());
}

/// A kvt experiment for the input checks: `extra` is appended.
fn kvt_experiment(p: &Project, extra: &str) {
    p.write(
        "config/experiments/in.yaml",
        &format!(
            "output: {{exp_group_id: in}}\ndataset: {{lengths: [256], per_length: 2}}\n\
             binning: {{n_bins: 1}}\nsampling: {{n_per_bin: 2}}\nengine: {{kind: reference}}\n\
             kv: {{policies: [streaming], budgets: [1.0, 0.5]}}\n{extra}"
        ),
    );
}

/// Issue #26, findings 9 and 11: inputs a build will read passed `kvt
/// validate` and failed later (an unknown `tokenizer.name` at `prepare`
/// with exit 1; a `dataset.path` without an extension with no file:line; a
/// missing `model_path`, an unset `KVT_MODEL`, a glob matching nothing).
/// Each is now refused by `validate` itself: exit 2, file:line and key.
#[test]
fn regression_inputs_a_build_reads_are_checked_by_validate() {
    let p = Project::new();
    p.write(
        "data/noext",
        "{\"context\": \"c\", \"input\": \"q\", \"answers\": [\"a\"]}\n",
    );
    for (extra, key, says) in [
        (
            "tokenizer: {kind: tiktoken, name: gpt2}",
            "tokenizer.name",
            "not a tiktoken encoding",
        ),
        (
            "tokenizer: {kind: hf, name: no/such-model}",
            "tokenizer.name",
            "nothing is downloaded",
        ),
        (
            "dataset: {source: file, name: d, task: qa, path: data/noext}",
            "dataset.path",
            "not supported",
        ),
        (
            "dataset: {source: file, name: d, task: qa, path: \"data/*.jsonl\"}",
            "dataset.path",
            "matches no file",
        ),
        (
            "engine: {kind: native, model_path: models/missing.gguf}",
            "engine.model_path",
            "does not exist",
        ),
    ] {
        // `dataset:` and `engine:` given twice would be a YAML error: the
        // override replaces the line of the same key.
        let top = extra.split(':').next().unwrap();
        let base = if top == "dataset" || top == "engine" {
            let mut text = String::new();
            kvt_experiment(&p, "");
            for l in p.read("config/experiments/in.yaml").lines() {
                if !l.starts_with(top) {
                    text.push_str(l);
                    text.push('\n');
                }
            }
            text.push_str(extra);
            text.push('\n');
            p.write("config/experiments/in.yaml", &text);
            text
        } else {
            kvt_experiment(&p, &format!("{extra}\n"));
            p.read("config/experiments/in.yaml")
        };
        let at = base.lines().position(|l| l.starts_with(top)).unwrap() + 1;
        let out = p
            .kvt()
            .args(["validate", "-c", "config/experiments/in.yaml"])
            .env_remove("KVT_MODEL")
            .output()
            .unwrap();
        expect_usage_error(
            &out,
            &[
                &format!("config/experiments/in.yaml:{at}"),
                &format!("`{key}`"),
                says,
            ],
        );
    }
    // The native engine with no model_path and no KVT_MODEL.
    kvt_experiment(&p, "");
    let out = p
        .kvt()
        .args(["validate", "-c", "config/experiments/in.yaml"])
        .args(["--set", "engine.kind=native"])
        .env_remove("KVT_MODEL")
        .output()
        .unwrap();
    expect_usage_error(&out, &["`engine.model_path`", "KVT_MODEL"]);
}

/// Issue #26, finding 10: error locations that were wrong or missing — a
/// top-level key written `"kv.budgets"`, a missing `base_url` reported at
/// `config/default.yaml`, invalid UTF-8 with no line (and a hint to pass
/// `-c` although `-c` was passed), an empty dataset file with no path, a
/// UTF-8 byte-order mark read as bad JSON.
#[test]
fn regression_error_locations_name_the_right_file_and_line() {
    let p = Project::new();
    let exp = "config/experiments/loc.yaml";
    let run = |args: &[&str]| p.kvt().args(args).output().unwrap();
    p.write(
        exp,
        "output: {exp_group_id: loc}\n\"kv.budgets\": [1.0, 0.5]\n",
    );
    let out = run(&["validate", "-c", exp]);
    expect_usage_error(&out, &[&format!("{exp}:2"), "unknown key `kv.budgets`"]);

    p.write(
        exp,
        "output: {exp_group_id: loc}\n# comment\nengine: {kind: openai}\n",
    );
    let out = run(&["validate", "-c", exp]);
    expect_usage_error(&out, &[&format!("{exp}:3"), "`engine.base_url`"]);
    assert!(
        !stderr_of(&out).contains("default.yaml"),
        "{}",
        stderr_of(&out)
    );

    std::fs::write(p.path(exp), b"output: {exp_group_id: loc}\n# caf\xe9\n").unwrap();
    let out = run(&["validate", "-c", exp]);
    expect_usage_error(&out, &[&format!("{exp}:2"), "column 6", "UTF-8"]);
    assert!(
        !stderr_of(&out).contains("pass an experiment file"),
        "{}",
        stderr_of(&out)
    );

    let synthetic_to_file = |path: &str| {
        format!(
            "output: {{exp_group_id: loc}}\nengine: {{kind: reference}}\n\
             dataset: {{source: file, name: d, task: qa, path: {path}}}\n"
        )
    };
    p.write("data/empty.jsonl", "");
    p.write(exp, &synthetic_to_file("data/empty.jsonl"));
    let out = run(&["build", "prepare", "-c", exp]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("`empty.jsonl`"),
        "{}",
        stderr_of(&out)
    );

    let record = "{\"_id\": \"r1\", \"context\": \"one two three four\", \"input\": \"q\", \"answers\": [\"a\"]}\n";
    std::fs::write(
        p.path("data/bom.jsonl"),
        [b"\xEF\xBB\xBF".as_slice(), record.as_bytes()].concat(),
    )
    .unwrap();
    p.write(exp, &synthetic_to_file("data/bom.jsonl"));
    let out = run(&["build", "prepare", "-c", exp]);
    assert!(out.status.success(), "{}", stderr_of(&out));
}

/// Issue #26, finding 4: `engine.max_response_mib: 0` was accepted, every
/// answer became a final `ENGINE_ERROR`, the build exited 0, and restoring
/// the default did not bring the answers back (they were final in the
/// journal). Now the build refuses it before anything is sent.
#[test]
fn regression_max_response_mib_zero_is_refused_before_any_request() {
    let p = Project::new();
    kvt_experiment(&p, "");
    let out = p
        .kvt()
        .args(["build", "report", "-c", "config/experiments/in.yaml"])
        .args(["--set", "engine.max_response_mib=0"])
        .output()
        .unwrap();
    expect_usage_error(
        &out,
        &[
            "`engine.max_response_mib`",
            "at least 1",
            "--set engine.max_response_mib=0",
        ],
    );
    assert!(
        !p.path("cache/v1/journal.sqlite").exists(),
        "a request was sent"
    );
    assert!(!p.path("runs").exists());
}

/// Issue #31, item 2: `kv.decode` is checked by key — its interval, target
/// and policy, and that the engine is the native one (exit 2).
#[test]
fn kv_decode_is_checked_by_key() {
    let p = Project::new();
    expect_key_errors(
        &p,
        &[
            (
                "engine: {kind: native}\nkv: {decode: {interval: 0, target: 64}}",
                "kv.decode.interval",
                "at least 1",
            ),
            (
                "engine: {kind: native}\nkv: {decode: {interval: 8, target: -1}}",
                "kv.decode.target",
                "must be positive",
            ),
            (
                "engine: {kind: native}\nkv: {decode: {interval: 8, target: 64, policy: snapkv}}",
                "kv.decode.policy",
                "streaming, knorm, random",
            ),
            (
                "engine: {kind: reference}\nkv: {decode: {interval: 8, target: 64}}",
                "kv.decode",
                "runs on the native engine",
            ),
            (
                "engine: {kind: openai, base_url: \"http://127.0.0.1:9/v1\"}\nkv: {decode: {interval: 8, target: 64}}",
                "kv.decode",
                "engine.send_kv: true",
            ),
            (
                "engine: {kind: native}\nkv: {decode: {interval: 8, target: 64, every: 2}}",
                "kv.decode.every",
                "valid keys here: interval, target, policy",
            ),
        ],
    );
}

/// Issue #31, item 1: `kv.compress: shared` needs an engine that keeps a
/// compressed context between questions: refused by key on an
/// OpenAI-compatible server (exit 2), accepted on the native engine's and
/// kvpress's roads and on the simulator.
#[test]
fn kv_compress_shared_needs_an_engine_that_keeps_a_context() {
    let p = Project::new();
    expect_key_errors(
        &p,
        &[
            (
                "engine: {kind: openai, base_url: \"http://127.0.0.1:9/v1\"}\nkv: {compress: shared}",
                "kv.compress",
                "cannot compress a context once and keep it",
            ),
            (
                "engine: {kind: openai, base_url: \"http://127.0.0.1:9/v1\"}\nkv: {compress: multi_turn}",
                "kv.compress",
                "cannot compress a context once and keep it",
            ),
            (
                "engine: {kind: reference}\nkv: {compress: once}",
                "kv.compress",
                "multi_turn",
            ),
        ],
    );
    for engine in [
        "{kind: openai, base_url: \"http://127.0.0.1:9/v1\", send_kv: true}",
        "{kind: reference}",
    ] {
        p.write(
            "config/experiments/ok.yaml",
            &format!(
                "pipeline: test\noutput: {{exp_group_id: b}}\nengine: {engine}\nkv: {{compress: shared}}\n"
            ),
        );
        let out = validate(&p, "config/experiments/ok.yaml", &[]);
        assert!(out.status.success(), "{engine}: {}", stderr_of(&out));
    }
}

/// Issue #31, item 4: `kv.score_dtype` names a precision kvt knows and an
/// engine that rounds scores (the native one, or a server sent `kvt`).
#[test]
fn kv_score_dtype_is_checked_by_key() {
    let p = Project::new();
    expect_key_errors(
        &p,
        &[
            (
                "engine: {kind: native}\nkv: {score_dtype: fp8}",
                "kv.score_dtype",
                "bf16",
            ),
            (
                "engine: {kind: reference}\nkv: {score_dtype: bf16}",
                "kv.score_dtype",
                "setting of the native engine",
            ),
        ],
    );
}
