//! Slot refill (continuous batching): a prefill that puts a new prompt into one row of a
//! running batch leaves every other row's state bit for bit as it was, and the refilled
//! row generates exactly what the same prompt generates in a fresh batch. Checked for the
//! dense cache and every budgeted policy, on every tiny family, with f32 and int8 storage.

mod common;

use common::{FAMILIES, backend, backend_stores, session, session_on, small, tiny_model};
use std::collections::BTreeMap;

use kvc_compiler::Overrides;
use kvc_compiler::ir::{Program, StateId};
use kvc_compiler::spec::{KvPolicy, KvStorage, Sampler};
use kvc_runtime::Backend;
use kvc_runtime::exec::session::{Refill, RefillChunk, Request, Sampling, Session, SessionOptions};
use kvc_runtime::load::random::HostTensor;

const B: usize = 3;

/// The tiny model `family` compiled with batch 3 and these settings, with its weights.
fn model(
    family: &str,
    kv: KvPolicy,
    storage: KvStorage,
    sampler: Sampler,
) -> (Program, BTreeMap<String, HostTensor>) {
    tiny_model(family, overrides(kv, storage, sampler), &[])
}

fn overrides(kv: KvPolicy, storage: KvStorage, sampler: Sampler) -> Overrides {
    Overrides {
        batch: Some(B as u32),
        kv: Some(kv),
        kv_storage: Some(storage),
        cache_len: Some(64),
        prefill_len: Some(8),
        sampler: Some(sampler),
        ..Overrides::default()
    }
}

/// A session whose prefills compute every padding position.
fn computing_padding(p: &Program, weights: &BTreeMap<String, HostTensor>) -> Session {
    let options = SessionOptions {
        skip_padding: false,
        ..SessionOptions::for_backend(backend())
    };
    session_on(p, weights, backend(), options)
}

fn request(prompt: &[u32], n: usize, sampling: Sampling) -> Request {
    Request {
        prompt: prompt.to_vec(),
        max_new_tokens: n,
        sampling,
    }
}

/// Every state variable, split into its `B` row slices (every state has `B` leading).
fn rows_of(s: &Session) -> Vec<Vec<Vec<u32>>> {
    (0..s.program().state.len())
        .map(|i| {
            let bits = s.state_bits(StateId(i as u32)).unwrap();
            bits.chunks(bits.len() / B).map(<[u32]>::to_vec).collect()
        })
        .collect()
}

/// Decodes `n` steps; returns each row's token after every step and its logits bits.
fn decode(s: &mut Session, n: usize) -> Vec<Vec<(u32, Vec<u32>)>> {
    let mut out = vec![Vec::new(); B];
    for _ in 0..n {
        let (step, logits) = s.step_logits().unwrap();
        for (r, row) in out.iter_mut().enumerate() {
            let bits = logits[r].iter().map(|x| x.to_bits()).collect();
            row.push((step.tokens[r], bits));
        }
    }
    out
}

/// Rows 0 and 2 run on while row 1 is refilled mid-generation (not done) with a prompt
/// longer than one chunk.
fn check(family: &str, kv: KvPolicy, storage: KvStorage, sampler: Sampler) {
    let what = format!("{family} {kv} {storage:?} {sampler:?}");
    let (p, weights) = model(family, kv, storage, sampler);
    let sp = match sampler {
        Sampler::Greedy => Sampling::default(),
        Sampler::Sample => Sampling {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
        },
    };
    let first = [
        request(&[5, 9, 14, 3, 7], 30, sp),
        request(&[11, 2, 8, 30, 1, 4, 6, 22, 19], 30, sp),
        request(&[40, 12, 3], 30, sp),
    ];
    let new = request(&[17, 3, 3, 25, 9, 1, 13, 2, 44, 6, 28], 12, sp);
    let (warm, after) = (4, 10);

    // The batch refilled at step `warm`.
    let mut a = session(&p, &weights);
    a.set_seed(5);
    a.prefill(&first, false).unwrap();
    decode(&mut a, warm);
    let before = rows_of(&a);
    let out = a
        .refill(&[Refill {
            row: 1,
            request: &new,
            seed: 77,
        }])
        .unwrap();
    let refilled = rows_of(&a);
    for (i, (old, now)) in before.iter().zip(&refilled).enumerate() {
        let name = &p.state[i].name;
        for r in [0, 2] {
            assert!(
                old[r] == now[r],
                "{what}: refill of row 1 changed {name} of row {r}"
            );
        }
    }
    assert!(!out.done[1], "{what}: the refilled row is not running");
    let a_steps = decode(&mut a, after);

    // The same with every padding position computed: the kernels that skip padding give
    // every state and logit of real tokens bit for bit (the CPU set skips by default).
    let mut d = computing_padding(&p, &weights);
    d.set_seed(5);
    d.prefill(&first, false).unwrap();
    decode(&mut d, warm);
    let d_out = d
        .refill(&[Refill {
            row: 1,
            request: &new,
            seed: 77,
        }])
        .unwrap();
    assert_eq!(
        out.tokens, d_out.tokens,
        "{what}: skipping padding changed a token"
    );
    assert!(
        rows_of(&d) == refilled,
        "{what}: skipping padding changed the state after the refill"
    );
    assert!(
        decode(&mut d, after) == a_steps,
        "{what}: skipping padding changed the steps after the refill"
    );

    // The same batch, never refilled.
    let mut b = session(&p, &weights);
    b.set_seed(5);
    b.prefill(&first, false).unwrap();
    decode(&mut b, warm);
    let b_steps = decode(&mut b, after);
    for r in [0, 2] {
        assert!(
            a_steps[r] == b_steps[r],
            "{what}: row {r} decodes differently after row 1 was refilled"
        );
    }

    // The refill one chunk at a time, with decode steps of the other rows in between: the
    // refilled row ends where the whole refill put it, and the others step on undisturbed.
    let mut e = session(&p, &weights);
    e.set_seed(5);
    e.prefill(&first, false).unwrap();
    decode(&mut e, warm);
    let piece = Refill {
        row: 1,
        request: &new,
        seed: 77,
    };
    let chunks = e.chunks(new.prompt.len());
    assert!(chunks > 1, "{what}: the new prompt spans chunks");
    let mut between = vec![Vec::new(); B];
    let mut e_out = None;
    for chunk in 0..chunks {
        let o = e
            .refill_chunk(&[RefillChunk {
                refill: piece,
                kept: 0,
                chunk,
            }])
            .unwrap();
        if chunk + 1 < chunks {
            assert!(o.done[1], "{what}: row 1 is parked between its chunks");
            for (r, steps) in decode(&mut e, 1).into_iter().enumerate() {
                between[r].extend(steps);
            }
        }
        e_out = Some(o);
    }
    let e_out = e_out.unwrap();
    assert_eq!(
        e_out.tokens[1], out.tokens[1],
        "{what}: chunked refill's first token"
    );
    assert!(!e_out.done[1], "{what}: the row runs after its last chunk");
    let e_steps = decode(&mut e, after);
    assert!(
        e_steps[1] == a_steps[1],
        "{what}: the row refilled chunk by chunk decodes differently"
    );
    for r in [0, 2] {
        let mut all = between[r].clone();
        all.extend(e_steps[r].iter().cloned());
        assert!(
            all[..after] == b_steps[r][..],
            "{what}: row {r} stepped differently while row 1 was refilled in chunks"
        );
    }

    // The new prompt in row 1 of a fresh batch, with the refill's seed.
    let mut c = session(&p, &weights);
    c.set_seed(77);
    let fresh = c
        .prefill(&[first[0].clone(), new.clone()], false)
        .unwrap()
        .0;
    assert_eq!(out.tokens[1], fresh.tokens[1], "{what}: first token");
    let c_steps = decode(&mut c, after);
    let tokens = |steps: &[(u32, Vec<u32>)]| steps.iter().map(|s| s.0).collect::<Vec<_>>();
    assert_eq!(
        tokens(&a_steps[1]),
        tokens(&c_steps[1]),
        "{what}: the refilled row generates what the prompt generates in a fresh batch"
    );
    assert!(
        a_steps[1] == c_steps[1],
        "{what}: the refilled row's logits differ from a fresh batch's"
    );
}

#[test]
fn refill_leaves_other_rows_untouched_and_restarts_its_row() {
    let mut policies = vec![KvPolicy::Dense];
    policies.extend(small());
    for family in FAMILIES {
        for &kv in &policies {
            check(family, kv, KvStorage::F32, Sampler::Greedy);
        }
    }
    for kv in [
        KvPolicy::Dense,
        KvPolicy::H2o {
            budget: 6,
            recent: 2,
        },
    ] {
        for storage in [KvStorage::I8, KvStorage::F16] {
            if backend_stores(storage) {
                check("tiny-llama", kv, storage, Sampler::Greedy);
            }
        }
    }
}

#[test]
fn a_refilled_row_samples_with_its_own_seed() {
    for kv in [KvPolicy::Dense, KvPolicy::Tova { budget: 6 }] {
        check("tiny-llama", kv, KvStorage::F32, Sampler::Sample);
    }
}

#[test]
fn refill_refuses_bad_rows() {
    let (p, weights) = model(
        "tiny-llama",
        KvPolicy::Dense,
        KvStorage::F32,
        Sampler::Greedy,
    );
    let mut s = session(&p, &weights);
    let r = request(&[1, 2, 3], 4, Sampling::default());
    let refill = |row| Refill {
        row,
        request: &r,
        seed: 0,
    };
    let err = s.refill(&[refill(B)]).unwrap_err().to_string();
    assert_eq!(err, "row 3 is outside the compiled batch of 3 rows");
    let err = s.refill(&[refill(1), refill(1)]).unwrap_err().to_string();
    assert_eq!(err, "row 1 is refilled twice in one call");
    let long = request(&[1; 60], 10, Sampling::default());
    let err = s
        .refill(&[Refill {
            row: 0,
            request: &long,
            seed: 0,
        }])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("row 0: 60 prompt tokens + 10 new tokens need 69"),
        "{err}"
    );
}

/// A sampling program whose rows are all greedy (the executor then skips the sort) picks
/// what the greedy program picks, and so does a greedy row beside a sampled one.
#[test]
fn greedy_rows_of_a_sampling_program_match_the_greedy_program() {
    let kv = KvPolicy::Dense;
    let (greedy, weights) = model("tiny-llama", kv, KvStorage::F32, Sampler::Greedy);
    let (sampling, _) = model("tiny-llama", kv, KvStorage::F32, Sampler::Sample);
    let prompt = [5, 9, 14, 3, 7];
    let warm = Sampling {
        temperature: 0.9,
        top_k: 0,
        top_p: 1.0,
    };
    let run = |p: &Program, second: Sampling| {
        let mut s = session(p, &weights);
        let reqs = [
            request(&prompt, 20, Sampling::default()),
            request(&prompt, 20, second),
        ];
        let out = s.generate(&reqs, &mut |_, _| {}).unwrap();
        out[0].ids.clone()
    };
    let want = run(&greedy, Sampling::default());
    assert_eq!(run(&sampling, Sampling::default()), want, "all rows greedy");
    assert_eq!(
        run(&sampling, warm),
        want,
        "a greedy row beside a sampled one"
    );
}

/// The scheduler's usual refill: several rows in one call, one of them already done and
/// one still running, with prompts of one and three chunks; the row left out stays bit
/// for bit, and each refilled row generates what its prompt generates in a fresh batch.
#[test]
fn several_rows_refilled_at_once() {
    for kv in [
        KvPolicy::Dense,
        KvPolicy::H2o {
            budget: 6,
            recent: 2,
        },
    ] {
        let what = format!("{kv}");
        let (p, weights) = model("tiny-llama", kv, KvStorage::F32, Sampler::Greedy);
        let sp = Sampling::default();
        let first = [
            request(&[5, 9, 14], 2, sp),
            request(&[11, 2, 8, 30, 1], 30, sp),
            request(&[40, 12, 3, 7], 30, sp),
        ];
        let short = request(&[3, 1, 4], 10, sp);
        let long = request(&(1..20).map(|i| i * 3 % 50).collect::<Vec<u32>>(), 10, sp);
        let mut a = session(&p, &weights);
        a.prefill(&first, false).unwrap();
        decode(&mut a, 3);
        let out = a.step().unwrap();
        assert_eq!(
            out.done,
            [true, false, false],
            "{what}: row 0 is done, 1 and 2 run"
        );
        let kept = rows_of(&a);
        a.refill(&[
            Refill {
                row: 0,
                request: &short,
                seed: 0,
            },
            Refill {
                row: 2,
                request: &long,
                seed: 0,
            },
        ])
        .unwrap();
        for (i, (old, now)) in kept.iter().zip(rows_of(&a)).enumerate() {
            assert!(
                old[1] == now[1],
                "{what}: refilling rows 0 and 2 changed {} of row 1",
                p.state[i].name
            );
        }
        let after = decode(&mut a, 8);
        let mut fresh = session(&p, &weights);
        fresh
            .prefill(&[short.clone(), first[1].clone(), long.clone()], false)
            .unwrap();
        let want = decode(&mut fresh, 8);
        for r in [0, 2] {
            assert!(
                after[r] == want[r],
                "{what}: refilled row {r} differs from a fresh batch"
            );
        }
    }
}

/// A prompt that begins with the row's previous prompt keeps that prefix in the dense
/// cache and prefills only the rest (prompt reuse): the row then generates what the whole
/// prompt generates in a fresh batch, logits bit for bit, while the other rows step on. A
/// budgeted cache or a sliding window (Gemma's local layers) refuses a kept prefix.
#[test]
fn a_kept_prefix_refills_like_the_whole_prompt() {
    // Width 8 runs the few-row attention kernel on the tiny models, 16 the chunk kernel.
    let cases = FAMILIES.iter().map(|&f| (f, KvStorage::F32, 8)).chain([
        ("tiny-llama", KvStorage::I8, 8),
        ("tiny-llama", KvStorage::F16, 8),
        ("tiny-llama", KvStorage::F32, 16),
        ("tiny-qwen2", KvStorage::F16, 16),
    ]);
    for (family, storage, width) in cases.filter(|&(_, s, _)| backend_stores(s)) {
        let what = format!("{family} {storage:?} T={width}");
        let o = Overrides {
            prefill_len: Some(width),
            ..overrides(KvPolicy::Dense, storage, Sampler::Greedy)
        };
        let (p, weights) = tiny_model(family, o, &[]);
        // The CPU set's forms (the test backend's portable set has no chunk kernel).
        if width == 16 && backend() == Backend::Flex {
            assert!(
                session(&p, &weights)
                    .plan_text()
                    .contains("attention chunk"),
                "{what}: the chunk kernel runs"
            );
        }
        let sp = Sampling::default();
        let first = [
            request(&[5, 9, 14], 30, sp),
            request(&[11, 2, 8, 30, 1, 4, 6, 22, 19, 3, 7], 4, sp),
            request(&[40, 12, 3, 7], 30, sp),
        ];
        let mut a = session(&p, &weights);
        a.prefill(&first, false).unwrap();
        let generated: Vec<u32> = decode(&mut a, 3).remove(1).iter().map(|s| s.0).collect();
        // The conversation goes on: the old prompt, what it generated, a new turn.
        let mut cont = first[1].prompt.clone();
        cont.extend(&generated);
        cont.extend([13, 2, 44, 6, 28, 9, 9, 1, 17]);
        let cont = request(&cont, 8, sp);
        let kept = first[1].prompt.len();
        let refill = Refill {
            row: 1,
            request: &cont,
            seed: 0,
        };
        if !a.keeps_every_position() {
            // Sliding-window layers keep only their last slots: no prefix survives.
            assert_eq!(
                family, "tiny-gemma3",
                "{what}: which programs keep every position"
            );
            let err = a
                .refill_chunk(&[RefillChunk {
                    refill,
                    kept,
                    chunk: 0,
                }])
                .unwrap_err()
                .to_string();
            assert!(err.contains("needs a dense cache"), "{what}: {err}");
            continue;
        }
        let mut out = None;
        for chunk in 0..a.chunks(cont.prompt.len() - kept) {
            out = Some(
                a.refill_chunk(&[RefillChunk {
                    refill,
                    kept,
                    chunk,
                }])
                .unwrap(),
            );
        }
        let out = out.unwrap();
        let steps = decode(&mut a, 6);
        let mut fresh = session(&p, &weights);
        let (want, _) = fresh
            .prefill(&[first[0].clone(), cont.clone()], false)
            .unwrap();
        assert_eq!(out.tokens[1], want.tokens[1], "{what}: first token");
        let want_steps = decode(&mut fresh, 6);
        assert!(
            steps[1] == want_steps[1],
            "{what}: the row that kept its prefix generates differently"
        );
    }
    let (p, weights) = model(
        "tiny-llama",
        KvPolicy::H2o {
            budget: 6,
            recent: 2,
        },
        KvStorage::F32,
        Sampler::Greedy,
    );
    let mut a = session(&p, &weights);
    let r = request(&[1, 2, 3, 4], 4, Sampling::default());
    a.prefill(std::slice::from_ref(&r), false).unwrap();
    let refill = Refill {
        row: 0,
        request: &r,
        seed: 0,
    };
    let err = a
        .refill_chunk(&[RefillChunk {
            refill,
            kept: 2,
            chunk: 0,
        }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a dense cache"), "{err}");
}
