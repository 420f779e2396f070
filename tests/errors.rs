//! Error snapshots: each class of hostile or mistaken input (tampered artifacts, sizes
//! past the machine, bad spec fields, bad options and paths) makes `kvc` exit with code 1
//! (2 for a command line that does not parse) and one `error:` line, never a panic or an abort, under a 4 GiB address-space limit
//! (`ulimit -v`). The line is snapshotted (`tests/snapshots/errors__*.snap`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `kvc ARGS` under `ulimit -v` and returns (exit code, stderr).
fn kvc(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_kvc"))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("running kvc");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `exit N: ` and the one `error:` line, with the temporary directory written as
/// `<tmp>`. The exit code is 1, or 2 for a command line that does not parse.
fn error_line(name: &str, code: Option<i32>, stderr: &str, tmp: &Path) -> String {
    assert!(!stderr.contains("panicked"), "{name}: panicked:\n{stderr}");
    assert!(
        matches!(code, Some(1 | 2)),
        "{name}: exit code {code:?}:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{name}: expected one error line:\n{stderr}"
    );
    let line = errors[0].replace(&tmp.display().to_string(), "<tmp>");
    format!("exit {}: {line}", code.unwrap_or_default())
}

/// A tiny-llama artifact compiled into `dir`, its `program.json` edited by `edit`.
fn artifact(dir: &Path, edit: impl Fn(&mut Value)) -> String {
    let (code, err) = kvc(&[
        "compile".into(),
        "models/tiny-llama.ron".into(),
        "-o".into(),
        dir.display().to_string(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let path = dir.join("program.json");
    let mut p: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut p);
    std::fs::write(&path, serde_json::to_vec(&p).unwrap()).unwrap();
    dir.display().to_string()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_class_of_bad_input_is_one_error_line() {
    let tmp = std::env::temp_dir().join(format!("kvc-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let run = |dir: String, extra: &[&str]| {
        let mut a = args(&["run", &dir, "--prompt", "hi"]);
        a.extend(args(extra));
        a
    };
    let first_binary = |p: &mut Value, from: &str, to: &str| {
        let nodes = p["decode"]["nodes"].as_array_mut().unwrap();
        let n = nodes
            .iter_mut()
            .find(|n| n["op"]["Binary"]["op"] == from)
            .unwrap();
        n["op"]["Binary"]["op"] = json!(to);
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "artifact_add_swapped_for_mul",
            run(
                artifact(&tmp.join("a1"), |p| first_binary(p, "Add", "Mul")),
                &[],
            ),
        ),
        (
            "artifact_state_of_2_to_the_64_elements",
            run(
                artifact(&tmp.join("a2"), |p| {
                    p["state"].as_array_mut().unwrap().push(json!({
                        "name": "x", "ty": {"dtype": "F32", "shape": [65536, 65536, 65536, 65536]},
                        "init": {"F32": 0.0}, "doc": "", "role": "Pos"
                    }))
                }),
                &[],
            ),
        ),
        (
            "artifact_huge_constant",
            run(
                artifact(&tmp.join("a3"), |p| {
                    let nodes = p["decode"]["nodes"].as_array_mut().unwrap();
                    let n = nodes
                        .iter_mut()
                        .find(|n| n["op"].get("Const").is_some())
                        .unwrap();
                    let big = json!([4294967295u64, 4294967295u64]);
                    n["op"]["Const"]["shape"] = big.clone();
                    n["ty"]["shape"] = big;
                }),
                &[],
            ),
        ),
        (
            "artifact_done_never_set",
            run(
                artifact(&tmp.join("a4"), |p| {
                    // `done` reads a constant false instead of the stop test.
                    let nodes = p["decode"]["nodes"].as_array_mut().unwrap();
                    let at = nodes.len();
                    nodes.push(
                        json!({"op": {"Const": {"value": {"Bool": false}, "shape": [3]}},
                                      "ty": {"dtype": "Bool", "shape": [3]}}),
                    );
                    let outs = p["decode"]["outputs"].as_array_mut().unwrap();
                    let done = outs.iter_mut().find(|o| o["name"] == "done").unwrap();
                    done["value"] = json!(at);
                }),
                &[],
            ),
        ),
        (
            "artifact_stop_token_outside_vocab",
            run(
                artifact(&tmp.join("a5"), |p| {
                    p["spec"]["stop_tokens"] = json!([999999])
                }),
                &[],
            ),
        ),
        (
            "artifact_older_version",
            run(artifact(&tmp.join("a6"), |p| p["version"] = json!(1)), &[]),
        ),
        (
            "artifact_with_kv_option",
            run(artifact(&tmp.join("a7"), |_| {}), &["--kv", "window:8"]),
        ),
        (
            "artifact_missing",
            run(tmp.join("none").display().to_string(), &[]),
        ),
        (
            "plan_over_max_memory",
            args(&[
                "run",
                "models/tiny-llama.ron",
                "--prompt",
                "hi",
                "--batch",
                "100000",
                "--max-memory",
                "1GiB",
            ]),
        ),
        (
            "max_memory_not_a_size",
            args(&[
                "run",
                "models/tiny-llama.ron",
                "--prompt",
                "hi",
                "--max-memory",
                "lots",
            ]),
        ),
        (
            "spec_too_many_stop_tokens",
            args(&[
                "compile",
                "compiler/tests/fixtures/invalid/too_many_stop_tokens.ron",
            ]),
        ),
        (
            "spec_name_escapes_out",
            args(&[
                "compile",
                "compiler/tests/fixtures/invalid/name_escapes_out.ron",
            ]),
        ),
        (
            "spec_wheel_package_is_an_option",
            args(&[
                "compile",
                "compiler/tests/fixtures/invalid/wheel_package_is_an_option.ron",
            ]),
        ),
        ("spec_missing", args(&["compile", "models/none.ron"])),
        (
            "bench_context_past_u32",
            args(&[
                "bench",
                "models/tiny-llama.ron",
                "--context",
                "4294967295",
                "--batch",
                "1",
            ]),
        ),
        (
            "bench_json_unwritable",
            args(&[
                "bench",
                "models/tiny-llama.ron",
                "--context",
                "8",
                "--batch",
                "1",
                "--json",
                "/nonexistent/dir/x.json",
            ]),
        ),
        (
            "bench_json_is_a_device",
            args(&[
                "bench",
                "models/tiny-llama.ron",
                "--context",
                "8",
                "--batch",
                "1",
                "--json",
                "/dev/full",
            ]),
        ),
        (
            "bench_refill_past_context",
            args(&[
                "bench",
                "models/tiny-llama.ron",
                "--context",
                "8",
                "--batch",
                "1",
                "--refill",
                "9",
            ]),
        ),
        (
            "bench_child_error_said_once",
            args(&[
                "bench",
                "models/tiny-llama.ron",
                "--context",
                "8",
                "--batch",
                "1",
                "--max-memory",
                "1KiB",
            ]),
        ),
        ("spec_is_a_device", args(&["compile", "/dev/zero"])),
        (
            "spec_wheel_version_leaves_the_cache",
            args(&[
                "compile",
                "compiler/tests/fixtures/invalid/wheel_version_leaves_the_cache.ron",
            ]),
        ),
        (
            "eval_results_file_is_a_device",
            args(&["eval", "models/tiny-llama.ron", "--json", "/dev/zero"]),
        ),
        (
            "eval_results_md_in_a_missing_directory",
            args(&[
                "eval",
                "models/tiny-llama.ron",
                "--results-md",
                "/nonexistent/dir/r.md",
            ]),
        ),
        (
            "eval_plot_is_a_file",
            args(&["eval", "models/tiny-llama.ron", "--plot", "Cargo.toml"]),
        ),
        (
            "eval_passkey_length_past_the_positions",
            args(&[
                "eval",
                "models/tiny-llama.ron",
                "--tasks",
                "passkey",
                "--passkey-lengths",
                "99999999",
            ]),
        ),
        (
            "eval_passkey_length_too_short",
            args(&[
                "eval",
                "models/smollm2-135m.ron",
                "--tasks",
                "passkey",
                "--passkey-lengths",
                "1",
            ]),
        ),
        (
            "prompt_file_missing",
            args(&[
                "run",
                "models/tiny-llama.ron",
                "--prompt-file",
                "/nonexistent/prompt.txt",
            ]),
        ),
        (
            "eval_budget_over_100_percent",
            args(&["eval", "models/tiny-llama.ron", "--budgets", "25%,120%"]),
        ),
        (
            "eval_unknown_policy",
            args(&["eval", "models/tiny-llama.ron", "--policies", "dense,lru"]),
        ),
        (
            "eval_other_settings_in_results_file",
            args(&[
                "eval",
                "models/tiny-llama.ron",
                "--json",
                "tests/fixtures/eval/other-settings.json",
            ]),
        ),
        (
            "score_text_longer_than_the_cache",
            args(&[
                "score",
                "models/smollm2-135m.ron",
                "--cache-len",
                "64",
                "--text",
                &"the sky is blue ".repeat(100),
            ]),
        ),
    ];
    for (name, a) in cases {
        let (code, stderr) = kvc(&a);
        let line = error_line(name, code, &stderr, &tmp);
        insta::assert_snapshot!(name, line);
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Without an NVIDIA driver, `--backend cuda` is one error line that names what is missing,
/// before any weights are read (builds with the `cuda` feature: `scripts/cuda-build.sh`).
/// Where a driver and GPU are present the run succeeds instead, and the GPU check
/// (`scripts/gpu-check.sh`) covers it.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_driver_is_one_error_line() {
    let args = [
        "run",
        "models/tiny-llama.ron",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "1",
        "--backend",
        "cuda",
    ];
    let (code, stderr) = kvc(&args.map(String::from));
    if code == Some(0) {
        return;
    }
    let tmp = std::env::temp_dir();
    let line = error_line("cuda", code, &stderr, &tmp);
    assert!(line.contains("CUDA"), "{line}");
}
