//! The execution plan's promises on the tiny random-weight model, for both kernel sets:
//!
//! - the portable kernels (Burn ops: what every non-CPU backend runs; on the test backend,
//!   Flex unless `KVC_TEST_BACKEND` says otherwise) and kvc's CPU kernels on Flex give the
//!   same tokens, logits and kept cache slots for the same programs — dense and every
//!   budgeted policy, int8 storage, padding, an idle row, chunked prefill, teacher forcing
//!   and sampling;
//! - a decode step reads back nothing but its `[B]` token and done vectors;
//! - the state keeps its buffers across runs, and a decode step recorded with
//!   `burn::tensor::capture` (re-run on Flex) gives what plain steps give, its warm-up
//!   runs advancing no row.

mod common;

use common::{FAMILIES, backend, backend_stores, max_diff, session_on, small, tiny_model};
use kvc_compiler::Overrides;
use kvc_compiler::ir::Program;
use kvc_compiler::spec::{KvPolicy, KvStorage, Sampler};
use kvc_runtime::Backend;
use kvc_runtime::exec::bind_params;
use kvc_runtime::exec::{KernelSet, Request, Sampling, Session, SessionOptions};
use kvc_runtime::load::random::HostTensor;
use std::collections::BTreeMap;

type Weights = BTreeMap<String, HostTensor>;

/// Dense and every budgeted policy with budgets that evict in prefill and in decode
/// (T = 8), plus int8 and f16 storage for a dense, a scored and an unscored cache (on
/// backends with int8 and f16 tensors).
fn programs() -> Vec<(KvPolicy, KvStorage)> {
    let mut all = every_program();
    all.retain(|&(_, storage)| backend_stores(storage));
    all
}

fn every_program() -> Vec<(KvPolicy, KvStorage)> {
    let mut all = vec![
        (KvPolicy::Dense, KvStorage::F32),
        (KvPolicy::Dense, KvStorage::I8),
        (KvPolicy::Dense, KvStorage::F16),
    ];
    for kv in small() {
        all.push((kv, KvStorage::F32));
        if matches!(kv, KvPolicy::H2o { .. } | KvPolicy::Random { .. }) {
            all.push((kv, KvStorage::I8));
            all.push((kv, KvStorage::F16));
        }
    }
    all
}

fn compiled(kv: KvPolicy, storage: KvStorage, sampler: Sampler) -> (Program, Weights) {
    compiled_of("tiny-llama", kv, storage, sampler)
}

fn compiled_of(
    family: &str,
    kv: KvPolicy,
    storage: KvStorage,
    sampler: Sampler,
) -> (Program, Weights) {
    tiny_model(
        family,
        Overrides {
            kv: Some(kv),
            kv_storage: Some(storage),
            cache_len: Some(64),
            batch: Some(4),
            sampler: Some(sampler),
            ..Overrides::default()
        },
        &[],
    )
}

/// Three prompts (3 tokens, one chunk of 8, three chunks) in a batch of 4: one row idle.
fn requests(sampling: Sampling) -> Vec<Request> {
    [
        vec![5, 17, 200],
        (30..38).collect(),
        (100..121).map(|t| t * 7 % 256).collect::<Vec<u32>>(),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, prompt)| Request {
        prompt,
        max_new_tokens: 4 + 3 * i,
        sampling,
    })
    .collect()
}

/// The CPU kernels on Flex: the reference of the portable set.
fn cpu(p: &Program, w: &Weights) -> Session {
    let options = SessionOptions {
        kernels: KernelSet::Cpu,
        capture: false,
        max_memory: None,
        skip_padding: true,
    };
    session_on(p, w, Backend::Flex, options)
}

/// A session of `set` on the test backend (the CPU set only runs on Flex).
fn session(p: &Program, w: &Weights, set: KernelSet, capture: bool) -> Session {
    let on = if set == KernelSet::Cpu {
        Backend::Flex
    } else {
        backend()
    };
    session_on(
        p,
        w,
        on,
        SessionOptions {
            kernels: set,
            capture,
            max_memory: None,
            skip_padding: true,
        },
    )
}

/// Everything a run shows: per graph run, the tokens, done flags, logits of the three
/// rows and every layer's slot table (budgeted policies).
#[derive(Debug)]
struct Trace {
    tokens: Vec<Vec<u32>>,
    done: Vec<Vec<bool>>,
    logits: Vec<Vec<Vec<f32>>>,
    tables: Vec<Vec<Vec<i32>>>,
}

fn trace(s: &mut Session, reqs: &[Request]) -> Trace {
    let layers = s.program().interface().unwrap().layers.len() as u32;
    let tables = |s: &Session| -> Vec<Vec<i32>> {
        (0..layers)
            .filter_map(|l| s.slot_positions(l).unwrap())
            .collect()
    };
    let mut t = Trace {
        tokens: vec![],
        done: vec![],
        logits: vec![],
        tables: vec![],
    };
    s.set_seed(9);
    let (out, last) = s.prefill(reqs, true).unwrap();
    t.tokens.push(out.tokens);
    t.done.push(out.done.clone());
    t.logits.push(last);
    t.tables.push(tables(s));
    let mut done = out.done;
    while !done[..reqs.len()].iter().all(|&d| d) {
        let (out, logits) = s.step_logits().unwrap();
        t.tokens.push(out.tokens);
        t.done.push(out.done.clone());
        t.logits.push(logits[..reqs.len()].to_vec());
        t.tables.push(tables(s));
        done = out.done;
    }
    t
}

fn assert_same(a: &Trace, b: &Trace, what: &str) {
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    assert_eq!(a.done, b.done, "{what}: done flags");
    assert_eq!(a.tables, b.tables, "{what}: kept slots");
    assert_eq!(a.logits.len(), b.logits.len(), "{what}: runs");
    for (i, (x, y)) in a.logits.iter().zip(&b.logits).enumerate() {
        for (row, (x, y)) in x.iter().zip(y).enumerate() {
            let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            let d = max_diff(x, &y);
            assert!(d < 1e-4, "{what}: run {i} row {row}: logits differ by {d}");
        }
    }
}

#[test]
fn portable_and_cpu_kernels_agree_on_every_program() {
    for (kv, storage) in programs() {
        for (sampler, sampling) in [
            (Sampler::Greedy, Sampling::default()),
            (
                Sampler::Sample,
                Sampling {
                    temperature: 1.3,
                    top_k: 20,
                    top_p: 0.9,
                },
            ),
        ] {
            let what = format!("{kv} {storage:?} {sampler:?}");
            let (p, w) = compiled(kv, storage, sampler);
            let reqs = requests(sampling);
            let mut portable = session(&p, &w, KernelSet::Portable, false);
            assert_eq!(portable.kernel_set(), KernelSet::Portable);
            let a = trace(&mut cpu(&p, &w), &reqs);
            let b = trace(&mut portable, &reqs);
            assert!(a.tokens.len() > 4, "{what}: decode ran");
            assert_same(&a, &b, &what);
        }
    }
}

/// The other families' ops (Qwen2's biases, Gemma 3's GELU, Q/K norms, scaled
/// embeddings and sliding-window layers) under both kernel sets.
#[test]
fn portable_and_cpu_kernels_agree_on_every_family() {
    for family in FAMILIES {
        for kv in [KvPolicy::Dense, small()[2]] {
            let what = format!("{family} {kv}");
            let (p, w) = compiled_of(family, kv, KvStorage::F32, Sampler::Greedy);
            let reqs = requests(Sampling::default());
            let mut portable = session(&p, &w, KernelSet::Portable, false);
            let a = trace(&mut cpu(&p, &w), &reqs);
            let b = trace(&mut portable, &reqs);
            assert!(a.tokens.len() > 4, "{what}: decode ran");
            assert_same(&a, &b, &what);
        }
    }
}

#[test]
fn teacher_forcing_agrees_across_kernel_sets() {
    let ids: Vec<u32> = (0..30).map(|t| (t * 37 + 11) % 256).collect();
    let scored = |kv: &KvPolicy| matches!(kv, KvPolicy::H2o { .. } | KvPolicy::SnapKv { .. });
    let chosen = programs()
        .into_iter()
        .filter(|(kv, s)| *s == KvStorage::F32 && (*kv == KvPolicy::Dense || scored(kv)));
    for (kv, storage) in chosen {
        let (p, w) = compiled(kv, storage, Sampler::Greedy);
        let a = cpu(&p, &w).score(&ids).unwrap();
        let b = session(&p, &w, KernelSet::Portable, false)
            .score(&ids)
            .unwrap();
        assert_eq!(a.len(), ids.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            let d = max_diff(x, &y);
            assert!(d < 1e-4, "{kv}: position {i}: logits differ by {d}");
        }
    }
}

/// Counted reads go through the executor; the kernels and the run loop have no way to the
/// host but Burn's readback calls, which appear nowhere in `exec/` except `value.rs` (the
/// counted reads). Both facts together: a graph run makes no device→host transfer.
#[test]
fn a_decode_step_reads_back_only_its_token_and_done_vectors() {
    for (kv, storage) in programs() {
        for set in [KernelSet::Portable, KernelSet::Cpu] {
            let (p, w) = compiled(kv, storage, Sampler::Greedy);
            let mut s = session(&p, &w, set, false);
            s.prefill(&requests(Sampling::default()), false).unwrap();
            for _ in 0..3 {
                let before = s.host_reads();
                s.step().unwrap();
                assert_eq!(s.host_reads() - before, 2, "{kv} {set:?}: reads per step");
            }
        }
    }
    let root = common::repo_root().join("runtime/src/exec");
    let mut files = vec![];
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().unwrap() != "value.rs" {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 5, "found the executor's sources");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests inside a file may read results back.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for call in ["into_data", "to_data", "into_scalar"] {
            assert!(
                !code.contains(call),
                "{}: `{call}` reads a tensor back outside the counted reads",
                f.display()
            );
        }
    }
}

/// Buffer addresses are read on Flex.
#[test]
fn state_keeps_its_buffers_across_runs() {
    for (kv, storage) in programs() {
        for set in [KernelSet::Cpu, KernelSet::Portable] {
            let (p, w) = compiled(kv, storage, Sampler::Sample);
            let options = SessionOptions {
                kernels: set,
                capture: false,
                max_memory: None,
                skip_padding: true,
            };
            let mut s = session_on(&p, &w, Backend::Flex, options);
            let reqs = requests(Sampling {
                temperature: 0.8,
                top_k: 0,
                top_p: 1.0,
            });
            s.prefill(&reqs, false).unwrap();
            let before = s.state_buffers().expect("Flex");
            for _ in 0..3 {
                s.step().unwrap();
            }
            s.force_tokens(&[1, 2, 3, 4]).unwrap();
            s.step_logits().unwrap();
            let after = s.state_buffers().expect("Flex");
            let moved: Vec<&str> = p
                .state
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (a, b))| a != b)
                .map(|(d, _)| d.name.as_str())
                .collect();
            assert!(
                moved.is_empty(),
                "{kv} {storage:?} {set:?}: new buffers for {moved:?}"
            );
        }
    }
}

#[test]
fn a_captured_decode_step_replays_what_plain_steps_do() {
    for (kv, storage) in programs() {
        for set in [KernelSet::Cpu, KernelSet::Portable] {
            let what = format!("{kv} {storage:?} {set:?}");
            let (p, w) = compiled(kv, storage, Sampler::Greedy);
            let reqs = requests(Sampling::default());
            let a = trace(&mut session(&p, &w, set, false), &reqs);
            let mut captured = session(&p, &w, set, true);
            let b = trace(&mut captured, &reqs);
            assert_same(&a, &b, &what);
            // A second batch records its own step over its fresh state.
            let c = trace(&mut captured, &reqs);
            assert_same(&a, &c, &format!("{what}, second batch"));
        }
    }
    // Capture works on Flex only by re-running the step; the session says so by default.
    assert!(!SessionOptions::for_backend(Backend::Flex).capture);
}

/// Over 120 decode steps, replaying the recorded step gives the tokens and logits of plain
/// steps: each replay must write the cache, positions and flags the session holds (on
/// CUDA a replayed hardware graph writes the buffers it was recorded with; a step that
/// wrote copies instead would leave the cache unfilled and drift within a few tokens).
/// Dense f32 and f16 caches and a budgeted policy that evicts throughout.
#[test]
fn a_replayed_step_writes_the_sessions_state_over_120_steps() {
    let mut kinds = vec![
        (KvPolicy::Dense, KvStorage::F32),
        (
            KvPolicy::H2o {
                budget: 24,
                recent: 4,
            },
            KvStorage::F32,
        ),
    ];
    if backend_stores(KvStorage::F16) {
        kinds.push((KvPolicy::Dense, KvStorage::F16));
    }
    for (kv, storage) in kinds {
        let what = format!("{kv} {storage:?}, 120 steps");
        let (p, w) = tiny_model(
            "tiny-llama",
            Overrides {
                kv: Some(kv),
                kv_storage: Some(storage),
                cache_len: Some(160),
                batch: Some(2),
                ..Overrides::default()
            },
            &[],
        );
        let reqs: Vec<Request> = [vec![5, 17, 200, 9], (40..51).collect()]
            .into_iter()
            .map(|prompt| Request {
                prompt,
                max_new_tokens: 121,
                sampling: Sampling::default(),
            })
            .collect();
        let plain = trace(&mut session(&p, &w, KernelSet::Portable, false), &reqs);
        let replayed = trace(&mut session(&p, &w, KernelSet::Portable, true), &reqs);
        assert!(
            plain.tokens.len() > 120,
            "{what}: {} runs",
            plain.tokens.len()
        );
        assert_same(&plain, &replayed, &what);
    }
}

/// A backend without int8 (or f16) tensors refuses int8 (or f16) storage when the session
/// is made, naming the state and the fix, instead of failing inside a run.
#[test]
fn storage_is_refused_where_the_backend_lacks_its_dtype() {
    let on = backend();
    for storage in [KvStorage::I8, KvStorage::F16] {
        let held = backend_stores(storage);
        let (p, mut w) = compiled(KvPolicy::Dense, storage, Sampler::Greedy);
        let params = bind_params(&p, &mut w, on).unwrap();
        let made = Session::with_options(p, params, on, SessionOptions::for_backend(on));
        match made {
            Ok(_) => assert!(held, "{on:?} holds no {storage:?} tensors"),
            Err(e) => {
                assert!(!held, "{on:?}, {storage:?}: {e}");
                assert!(e.to_string().contains("--kv-storage f32"), "{e}");
            }
        }
    }
}

/// The plans update every cache of a decode step in place (a moved `kv_write` chain): a
/// shared cache would be copied whole at every step.
#[test]
fn decode_plans_update_the_caches_in_place() {
    use kvc_compiler::ir::StateRole;
    use kvc_runtime::exec::plan::WriteBack;
    use kvc_runtime::exec::{Executor, Which};
    for (kv, storage) in programs() {
        let (p, mut w) = compiled(kv, storage, Sampler::Greedy);
        let params = bind_params(&p, &mut w, Backend::Flex).unwrap();
        let device = kvc_runtime::device(Backend::Flex).unwrap();
        let exec = Executor::new(p.clone(), params, device, KernelSet::Cpu).unwrap();
        let mut caches = 0;
        for wb in &exec.plan(Which::Decode).writebacks {
            let (state, in_place) = match *wb {
                WriteBack::InPlace { state, .. } => (state, true),
                WriteBack::Assign { state, .. } => (state, false),
            };
            let decl = &p.state[state.0 as usize];
            if let StateRole::Cache { part, .. } = decl.role {
                use kvc_compiler::ir::CachePart::*;
                if matches!(part, Keys | Values | KeyScales | ValueScales) {
                    caches += 1;
                    assert!(in_place, "{kv} {storage:?}: {} is copied back", decl.name);
                }
            }
        }
        assert!(caches >= 2, "{kv}: the decode step updates its caches");
    }
}
