//! The budgeted KV policies in the compiled graphs: snapshots of each policy's decode
//! graph (the policy's ops are visible in the text form), fixed shapes across policies,
//! and the command-line form of a policy.

use std::path::{Path, PathBuf};

use kvc_compiler::ir::Program;
use kvc_compiler::spec::{KvPolicy, KvStorage};
use kvc_compiler::{MemoryPlan, Overrides, compile_file};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("models/tiny-llama.ron")
}

fn with(kv: KvPolicy) -> Program {
    let o = Overrides {
        kv: Some(kv),
        cache_len: Some(64),
        ..Overrides::default()
    };
    compile_file(&tiny(), &o).unwrap_or_else(|e| panic!("{kv}: {e}"))
}

/// Every policy at budget 16 (tiny-llama: B = 3, T = 8, 2 KV heads).
fn policies() -> Vec<KvPolicy> {
    vec![
        KvPolicy::Window { size: 16 },
        KvPolicy::SinkWindow {
            sinks: 4,
            window: 12,
        },
        KvPolicy::H2o {
            budget: 16,
            recent: 4,
        },
        KvPolicy::Tova { budget: 16 },
        KvPolicy::SnapKv {
            budget: 16,
            window: 4,
            pool: 3,
        },
        KvPolicy::Random {
            budget: 16,
            seed: 1,
        },
    ]
}

#[test]
fn each_policy_snapshots_its_decode_graph() {
    for kv in policies() {
        let p = with(kv);
        let name = kv.to_string().replace(':', "_");
        insta::assert_snapshot!(
            format!("{name}.decode"),
            p.display_graph(&p.decode).to_string()
        );
        insta::assert_snapshot!(format!("{name}.plan"), MemoryPlan::of(&p).to_string());
    }
    // Prefill differs from decode in the eviction (sort + gather); SnapKV adds pooling.
    for kv in [policies()[2], policies()[4]] {
        let p = with(kv);
        let name = kv.to_string().replace(':', "_");
        insta::assert_snapshot!(
            format!("{name}.prefill"),
            p.display_graph(&p.prefill).to_string()
        );
    }
}

#[test]
fn shapes_depend_only_on_the_budget_not_the_policy() {
    let all: Vec<Program> = policies().into_iter().map(with).collect();
    for p in &all {
        assert!(
            p.decode.inputs.is_empty(),
            "{}: decode reads host input",
            p.config.kv
        );
        let names: Vec<&str> = p.prefill.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["tokens", "len", "limit", "restart"]);
        // N = budget + T physical slots; the slot table has one entry per slot.
        let ty = |n: &str| {
            let id = p
                .state_id(n)
                .unwrap_or_else(|| panic!("{}: no {n}", p.config.kv));
            p.state[id.0 as usize].ty.to_string()
        };
        assert_eq!(ty("k.0"), "f32[3,2,24,16]");
        assert_eq!(ty("v.1"), "f32[3,2,24,16]");
        assert_eq!(ty("slot_pos.1"), "i32[3,2,24]");
        // The context (longest row) is the cache_len override, not the budget.
        assert_eq!(p.config.cache_len, 64);
        let sig = |p: &Program| (p.signature(&p.prefill), p.signature(&p.decode));
        let (pre, dec) = sig(p);
        let (pre0, dec0) = sig(&all[0]);
        let outs = |s: &str| {
            let tail = s.split("->").nth(1).unwrap_or_default();
            tail.split(" updates")
                .next()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(outs(&pre), outs(&pre0), "{}", p.config.kv);
        assert_eq!(outs(&dec), outs(&dec0), "{}", p.config.kv);
    }
    // Scored policies carry a score per slot; the others do not.
    for p in &all {
        let scored = matches!(
            p.config.kv,
            KvPolicy::H2o { .. } | KvPolicy::Tova { .. } | KvPolicy::SnapKv { .. }
        );
        assert_eq!(p.state_id("score.0").is_some(), scored, "{}", p.config.kv);
    }
}

#[test]
fn a_budgeted_policy_without_cache_len_grows_rows_to_max_positions() {
    let o = Overrides {
        kv: Some(KvPolicy::H2o {
            budget: 16,
            recent: 4,
        }),
        ..Overrides::default()
    };
    let p = compile_file(&tiny(), &o).unwrap();
    assert_eq!(
        p.config.cache_len, 256,
        "tiny-llama's max_position_embeddings"
    );
    let id = p.state_id("k.0").unwrap();
    assert_eq!(p.state[id.0 as usize].ty.shape, vec![3, 2, 24, 16]);
}

#[test]
fn command_line_form_parses_and_prints_back() {
    for kv in policies().into_iter().chain([KvPolicy::Dense]) {
        assert_eq!(KvPolicy::parse(&kv.to_string()), Ok(kv));
    }
    assert_eq!(
        KvPolicy::parse("random:32"),
        Ok(KvPolicy::Random {
            budget: 32,
            seed: 0
        })
    );
    let errors = [
        ("h2o:256", "expected h2o:BUDGET:RECENT (2 numbers), found 1"),
        (
            "h2o:256:x",
            "recent must be a non-negative integer, found `x`",
        ),
        ("paged:4", "unknown KV policy"),
        ("tova:1:2", "expected tova:BUDGET (1 numbers), found 2"),
    ];
    for (text, want) in errors {
        let err = KvPolicy::parse(text).unwrap_err();
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[test]
fn int8_storage_quantizes_on_write_and_shrinks_the_cache() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("models/smollm2-135m.ron");
    let plan = |storage| {
        let o = Overrides {
            kv: Some(KvPolicy::H2o {
                budget: 256,
                recent: 32,
            }),
            kv_storage: Some(storage),
            ..Overrides::default()
        };
        let p = compile_file(&path, &o).unwrap();
        let kv_bytes: u64 = p
            .state
            .iter()
            .filter(|s| {
                s.name.starts_with("k.") || s.name.starts_with("v.") || s.name.contains("_scale.")
            })
            .map(|s| s.ty.size_bytes())
            .sum();
        (p, kv_bytes)
    };
    let (_, f32_bytes) = plan(KvStorage::F32);
    let (p, i8_bytes) = plan(KvStorage::I8);
    // head_dim 64: 64 B + two 4 B scales (k and v) per token and head vs 256 B.
    assert_eq!(f32_bytes, 30 * 2 * 3 * 320 * 64 * 4);
    assert_eq!(i8_bytes, 30 * 2 * 3 * 320 * (64 + 4));
    let k0 = &p.state[p.state_id("k.0").unwrap().0 as usize];
    assert_eq!(k0.ty.to_string(), "i8[1,3,320,64]");
    let tiny_i8 = {
        let o = Overrides {
            kv: Some(KvPolicy::H2o {
                budget: 16,
                recent: 4,
            }),
            kv_storage: Some(KvStorage::I8),
            cache_len: Some(64),
            ..Overrides::default()
        };
        compile_file(&tiny(), &o).unwrap()
    };
    insta::assert_snapshot!(
        "h2o_16_4.i8.decode",
        tiny_i8.display_graph(&tiny_i8.decode).to_string()
    );
    // The state table with every cache part's role (the program's text form up to its
    // first graph).
    let text = tiny_i8.to_string();
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("state "))
        .take_while(|l| !l.is_empty())
        .collect();
    insta::assert_snapshot!("h2o_16_4.i8.state", table.join("\n"));
}
