//! `kvc eval` on the real SmolLM2 in a small configuration: the properties that must hold
//! whatever the policies' quality (dense against dense Δ = 0; a budget covering the
//! sequence gives dense's results; sink-window beats window at a small budget; dense
//! retrieves the passkey), the results file, and that a rerun resumes instead of
//! recomputing.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn eval(out: &std::path::Path) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kvc"))
        .current_dir(repo())
        .args([
            "eval",
            "models/smollm2-135m.ron",
            "--tasks",
            "fidelity,passkey",
            "--policies",
            "dense,window,sink-window,h2o",
            "--budgets",
            "25%,100%",
            "--docs",
            "2",
            "--doc-tokens",
            "192",
            "--passkey-lengths",
            "256",
            "--passkey-depths",
            "50",
            // Float weights: a budget that evicts nothing must then match dense to
            // rounding (the native kernels' 8-bit activations widen that; see
            // `full_budget_tolerance`).
            "--weight-dtype",
            "f32",
            "--check",
        ])
        .arg("--json")
        .arg(out.join("results.json"))
        .arg("--plot")
        .arg(out.join("plots"))
        .arg("--results-md")
        .arg(out.join("results.md"))
        .output()
        .expect("running kvc eval");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn cells<'a>(r: &'a Value, task: &str) -> &'a Vec<Value> {
    r[task].as_array().expect("a list of cells")
}

fn find<'a>(r: &'a Value, task: &str, policy: &str, budget: &str) -> &'a Value {
    cells(r, task)
        .iter()
        .find(|c| c["policy"] == policy && c["budget"] == budget)
        .unwrap_or_else(|| panic!("no {task} cell {policy} {budget}"))
}

#[test]
fn small_eval_holds_its_properties_and_resumes() {
    let out = std::env::temp_dir().join(format!("kvc-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let (ok, err) = eval(&out);
    assert!(ok, "kvc eval failed:\n{err}");
    assert!(err.contains("every property holds"), "{err}");
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();

    // 1 dense + 3 families × 2 budgets; passkey at two prefill widths (the spec's 64 and
    // `auto`, one chunk per prompt).
    assert_eq!(cells(&r, "fidelity").len(), 7);
    assert_eq!(cells(&r, "passkey").len(), 14);
    assert!(
        cells(&r, "passkey")
            .iter()
            .any(|c| c["width"] == "auto" && c["prefill_len"] == 256),
        "an auto-width cell takes the 250-odd-token prompt in one 256-wide chunk"
    );

    // The same program against itself: exactly dense.
    let dense = find(&r, "fidelity", "dense", "-");
    assert_eq!(dense["dnll"], 0.0);
    assert_eq!(dense["kl"], 0.0);
    assert_eq!(dense["top1"], 1.0);
    assert!(dense["ppl"].as_f64().unwrap() > 1.0);
    // Budgets that evict nothing: dense to rounding, over every position.
    for p in ["window", "sink-window", "h2o"] {
        let c = find(&r, "fidelity", p, "100%");
        assert!(c["dnll"].as_f64().unwrap().abs() < 1e-3, "{p}: {c}");
        assert!(c["kl"].as_f64().unwrap() < 1e-5, "{p}: {c}");
        assert_eq!(c["top1"], 1.0, "{p}");
        assert_eq!(c["docs"][0]["positions"], 191, "{p}");
    }
    // 48 tokens kept of 192: the sinks matter, and losing context costs likelihood.
    let w = find(&r, "fidelity", "window", "25%")["dnll"]
        .as_f64()
        .unwrap();
    let sw = find(&r, "fidelity", "sink-window", "25%")["dnll"]
        .as_f64()
        .unwrap();
    assert!(sw < w, "sink-window {sw} vs window {w}");
    assert!(sw > 0.0 && w > 0.0, "sink-window {sw}, window {w}");
    assert_eq!(find(&r, "fidelity", "window", "25%")["budget_tokens"], 48);

    // Dense finds the key at both widths; its answer's first token ranks first.
    for pk in cells(&r, "passkey")
        .iter()
        .filter(|c| c["policy"] == "dense")
    {
        assert_eq!(pk["rows"][0]["found"], true, "{pk}");
        assert_eq!(pk["rows"][0]["rank"], 0, "{pk}");
    }

    // The report and the charts.
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| sink-window | 25% | 48 |"), "{md}");
    assert!(md.contains("All hold"), "{md}");
    for f in [
        "fidelity_dppl.svg",
        "fidelity_kl.svg",
        "fidelity_top1.svg",
        "passkey_T64.svg",
    ] {
        let svg = std::fs::read_to_string(out.join("plots").join(f)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("sink-window"),
            "{f}"
        );
    }

    // A rerun finds every cell in the file and computes none.
    let (ok, err) = eval(&out);
    assert!(ok, "rerun failed:\n{err}");
    assert!(err.contains("eval: 0 cells computed"), "{err}");
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(again["fidelity"], r["fidelity"]);
    assert_eq!(again["passkey"], r["passkey"]);
    assert_eq!(
        again["runs"], r["runs"],
        "a rerun that computes nothing is not recorded"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
