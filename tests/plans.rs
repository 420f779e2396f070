//! `kvc inspect --plan` on the tiny models of each family: the execution plans of both
//! graphs as the CPU kernel set builds them (each step's kernel, the arguments it moves,
//! how every state update returns to its buffer), snapshotted
//! (`tests/snapshots/plans__*.snap`). A change to what the executor runs shows here.

use std::process::Command;

#[test]
fn tiny_models_plan_as_snapshotted() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gemma3"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvc"))
            .args(["inspect", "--plan", &format!("models/{name}.ron")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running kvc");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let text = String::from_utf8(out.stdout).expect("UTF-8");
        assert!(text.starts_with("plan prefill (kernel set cpu)"), "{text}");
        insta::assert_snapshot!(name, text);
    }
}
