//! `kvc bench` end to end on a tiny model: every configuration runs in its own child
//! process and the JSON record carries what was measured, including the timed refill of
//! row 0 (`--refill`, here as long as the context: the longest it accepts).

use std::process::Command;

#[test]
fn bench_records_a_timed_refill() {
    let dir = std::env::temp_dir().join(format!("kvc-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kvc"))
        .args([
            "bench",
            "models/tiny-llama.ron",
            "--batch",
            "1,3",
            "--context",
            "8",
        ])
        .args(["--steps", "2", "--refill", "8", "--json"])
        .arg(&json)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running kvc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("refill of row 0 with 8 tokens").count(),
        2,
        "{stdout}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = doc["results"].as_array().expect("results");
    let batches: Vec<u64> = results
        .iter()
        .map(|r| r["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(batches, [1, 3]);
    for r in results {
        assert_eq!(r["refill_tokens"], 8, "{r}");
        let ms = r["refill_ms"].as_f64().expect("refill_ms");
        assert!(ms.is_finite() && ms > 0.0, "{r}");
        assert!(r["prefill_tok_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["steps"], 2, "{r}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
