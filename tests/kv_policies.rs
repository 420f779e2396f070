//! The budgeted KV policies on the tiny random-weight model, against an eager float64
//! reference written here: per row, layer and KV head it keeps a plain list of (position,
//! key, value, score) and applies each policy's rule as `docs/kv-policies.md` states it
//! (no slots, no padding, no graph). The compiled graphs must keep the same position
//! sets after prefill and after every decode step, and give the same logits.

mod common;

use common::{FAMILIES, Reference, argmax, max_diff, session, small, tiny, tiny_model};
use kvc_compiler::Overrides;
use kvc_compiler::ir::Program;
use kvc_compiler::spec::{KvPolicy, KvStorage};
use kvc_runtime::exec::session::{Request, Sampling, Session};

/// Priority of protected tokens (as the compiled graphs use it).
const PROTECT: f64 = 1.0e9;

/// One kept token of one KV head.
#[derive(Clone, Debug)]
struct Entry {
    pos: usize,
    k: Vec<f64>,
    v: Vec<f64>,
    score: f64,
}

/// The policies' rules applied eagerly to one sequence.
struct Eager<'a> {
    r: Reference<'a>,
    /// Each layer's policy (a sliding-window layer has its own window).
    policy: Vec<KvPolicy>,
    width: usize,
    /// `cache[layer][kv_head]`.
    cache: Vec<Vec<Vec<Entry>>>,
    pos: usize,
    /// Keys and values go through int8 storage (`KvStorage::I8`).
    int8: bool,
}

/// Symmetric int8 round trip of one token's head vector, in f32 as the graphs do it:
/// scale = max(max |x|, 1e-30) · (1/127), x ≈ clamp(round(x / scale), ±127) · scale with
/// halves rounded to even.
fn int8_round_trip(x: &[f64]) -> Vec<f64> {
    let m = x.iter().fold(0.0f32, |m, v| m.max((*v as f32).abs()));
    let scale = m.max(1e-30) * (1.0 / 127.0);
    x.iter()
        .map(|v| (((*v as f32) / scale).round_ties_even().clamp(-127.0, 127.0) * scale) as f64)
        .collect()
}

/// murmur3's 32-bit finalizer (the hash `docs/kv-policies.md` specifies for `Random`).
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

impl<'a> Eager<'a> {
    fn new(p: &Program, r: Reference<'a>) -> Eager<'a> {
        let layers = r.c.num_layers as usize;
        let heads = r.c.num_kv_heads as usize;
        Eager {
            policy: p.config.layer_kv.clone(),
            width: p.config.prefill_len as usize,
            cache: vec![vec![vec![]; heads]; layers],
            pos: 0,
            int8: p.config.kv_storage == KvStorage::I8,
            r,
        }
    }

    /// Prefills `prompt` in chunks of the compiled width; returns the last logits.
    fn prefill(&mut self, prompt: &[u32]) -> Vec<f64> {
        let mut logits = vec![];
        for chunk in prompt.chunks(self.width) {
            logits = self.run(chunk, false);
        }
        logits
    }

    /// Appends `ids` at the next positions (one chunk or one decode step), attends,
    /// scores and evicts; returns the logits of the last token.
    fn run(&mut self, ids: &[u32], decode: bool) -> Vec<f64> {
        let c = self.r.c;
        let d = c.head_dim as usize;
        let (hq, hkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let group = hq / hkv;
        let (start, len) = (self.pos, ids.len());
        let after = start + len;
        let mut xs: Vec<Vec<f64>> = ids.iter().map(|&t| self.r.embed(t)).collect();
        for l in 0..c.num_layers {
            let qkv: Vec<_> = xs
                .iter()
                .enumerate()
                .map(|(t, x)| self.r.qkv(l, x, start + t))
                .collect();
            let li = l as usize;
            let policy = self.policy[li];
            let span = self.r.span(l);
            // Candidates per KV head: the kept tokens plus this chunk's.
            for (h, cands) in self.cache[li].iter_mut().enumerate() {
                for (t, (_, k, v)) in qkv.iter().enumerate() {
                    let (mut k, mut v) = (
                        k[h * d..(h + 1) * d].to_vec(),
                        v[h * d..(h + 1) * d].to_vec(),
                    );
                    if self.int8 {
                        (k, v) = (int8_round_trip(&k), int8_round_trip(&v));
                    }
                    cands.push(Entry {
                        pos: start + t,
                        k,
                        v,
                        score: 0.0,
                    });
                }
            }
            let weight = |t: usize| -> f64 {
                let chosen = match policy {
                    KvPolicy::H2o { .. } => true,
                    KvPolicy::Tova { .. } => t + 1 == len,
                    KvPolicy::SnapKv { window, .. } => decode || t + window as usize >= len,
                    _ => false,
                };
                if chosen { 1.0 } else { 0.0 }
            };
            let mut mass: Vec<Vec<f64>> =
                self.cache[li].iter().map(|e| vec![0.0; e.len()]).collect();
            for (t, x) in xs.iter_mut().enumerate() {
                let mut att = vec![0.0; hq * d];
                for head in 0..hq {
                    let h = head / group;
                    let cands = &self.cache[li][h];
                    let q_pos = start + t;
                    let seen: Vec<usize> = (0..cands.len())
                        .filter(|&i| cands[i].pos <= q_pos)
                        .filter(|&i| span.is_none_or(|w| q_pos - cands[i].pos < w))
                        .collect();
                    let keys: Vec<&[f64]> = seen.iter().map(|&i| cands[i].k.as_slice()).collect();
                    let values: Vec<&[f64]> = seen.iter().map(|&i| cands[i].v.as_slice()).collect();
                    let q = &qkv[t].0[head * d..(head + 1) * d];
                    let (probs, out) = self.r.attend(q, &keys, &values);
                    att[head * d..(head + 1) * d].copy_from_slice(&out);
                    for (&i, p) in seen.iter().zip(&probs) {
                        mass[h][i] += weight(t) * p / group as f64;
                    }
                }
                self.r.finish_layer(l, x, &att);
            }
            let Some(budget) = policy.budget() else {
                continue;
            };
            for (h, cands) in self.cache[li].iter_mut().enumerate() {
                let m = &mass[h];
                let gain: Vec<f64> = match policy {
                    KvPolicy::SnapKv { pool, .. } if !decode => {
                        let r = (pool / 2) as i64;
                        cands
                            .iter()
                            .map(|a| {
                                let near = cands
                                    .iter()
                                    .zip(m)
                                    .filter(|(b, _)| (a.pos as i64 - b.pos as i64).abs() <= r);
                                near.map(|(_, x)| x).sum::<f64>() / pool as f64
                            })
                            .collect()
                    }
                    _ => m.clone(),
                };
                for (e, g) in cands.iter_mut().zip(&gain) {
                    e.score = match policy {
                        KvPolicy::Tova { .. } => *g,
                        _ => e.score + g,
                    };
                }
                let prio = |e: &Entry| -> f64 {
                    let newest = |n: u32| e.pos + n as usize >= after;
                    match policy {
                        KvPolicy::Dense => unreachable!("dense layers evict nothing"),
                        KvPolicy::Window { .. } => 0.0,
                        KvPolicy::SinkWindow { sinks, .. } => f64::from(e.pos < sinks as usize),
                        KvPolicy::H2o { recent, .. } if newest(recent) => PROTECT,
                        KvPolicy::SnapKv { window, .. } if newest(window) => PROTECT,
                        // Decode ranks by the score per query that has seen the token.
                        KvPolicy::SnapKv { .. } if decode => e.score / (after - e.pos) as f64,
                        KvPolicy::H2o { .. } | KvPolicy::SnapKv { .. } | KvPolicy::Tova { .. } => {
                            e.score
                        }
                        KvPolicy::Random { seed, .. } => {
                            let s = seed ^ l.wrapping_mul(0x9E37_79B9);
                            let b = (after * hkv + h) as u32;
                            let x = fmix32(fmix32(s ^ e.pos as u32) ^ b);
                            (x >> 8) as f64 / 16_777_216.0
                        }
                    }
                };
                cands.sort_by(|a, b| prio(b).total_cmp(&prio(a)).then(b.pos.cmp(&a.pos)));
                cands.truncate(budget as usize);
            }
        }
        self.pos = after;
        self.r.logits(xs.last().expect("at least one token"))
    }

    /// Sorted kept positions of (layer, KV head).
    fn kept(&self, l: usize, h: usize) -> Vec<i32> {
        let mut v: Vec<i32> = self.cache[l][h].iter().map(|e| e.pos as i32).collect();
        v.sort();
        v
    }
}

/// Sorted kept positions of (row, layer, KV head) in a session.
fn kept(s: &Session, row: usize, l: u32, h: usize) -> Vec<i32> {
    let p = s.program();
    let table = s.slot_positions(l).unwrap().expect("budgeted policy");
    let kv = p.state[p.state_id(&format!("slot_pos.{l}")).unwrap().0 as usize]
        .ty
        .clone();
    let (heads, n) = (kv.shape[1] as usize, kv.shape[2] as usize);
    let base = (row * heads + h) * n;
    let mut v: Vec<i32> = table[base..base + n]
        .iter()
        .copied()
        .filter(|&x| x >= 0)
        .collect();
    v.sort();
    v
}

fn layers(p: &Program) -> u32 {
    p.spec.arch.dims().num_layers
}

type Weights = std::collections::BTreeMap<String, kvc_runtime::load::random::HostTensor>;

fn program(kv: KvPolicy) -> (Program, Weights) {
    program_stored(kv, KvStorage::F32)
}

fn program_stored(kv: KvPolicy, storage: KvStorage) -> (Program, Weights) {
    program_of("tiny-llama", kv, storage)
}

fn program_of(family: &str, kv: KvPolicy, storage: KvStorage) -> (Program, Weights) {
    tiny_model(
        family,
        Overrides {
            kv: Some(kv),
            kv_storage: Some(storage),
            cache_len: Some(64),
            ..Overrides::default()
        },
        &[],
    )
}

/// Lengths 3 (< budget), 8 (= T) and 21 (three chunks, far past the budget).
fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 200],
        (30..38).collect(),
        (100..121).map(|t| t * 7 % 256).collect(),
    ]
}

const STEPS: usize = 8;
const TOL: f64 = 1e-4;

fn requests() -> Vec<Request> {
    prompts()
        .into_iter()
        .map(|prompt| Request {
            prompt,
            max_new_tokens: STEPS + 1,
            sampling: Sampling::default(),
        })
        .collect()
}

#[test]
fn kept_sets_and_logits_match_the_eager_reference() {
    for family in FAMILIES {
        for kv in small() {
            check_against_reference(family, kv, KvStorage::F32);
        }
    }
}

#[test]
fn int8_storage_matches_the_reference_with_int8_round_trips() {
    if !common::backend_stores(KvStorage::I8) {
        // tests/kernel_sets.rs checks that such a backend refuses int8 storage.
        eprintln!("skipped: the test backend has no int8 tensors");
        return;
    }
    for kv in [small()[2], small()[4]] {
        check_against_reference("tiny-llama", kv, KvStorage::I8);
    }
}

/// Rows stop after different numbers of steps (2, 8 and 5), so the later steps decode
/// with idle rows whose caches are full.
fn staggered_requests() -> Vec<Request> {
    let mut reqs = requests();
    for (r, n) in reqs.iter_mut().zip([3, STEPS + 1, 6]) {
        r.max_new_tokens = n;
    }
    reqs
}

/// Every slot table of `row` (all layers, raw slot order).
fn raw_tables(s: &Session, row: usize, layers: u32) -> Vec<Vec<i32>> {
    (0..layers)
        .map(|l| {
            let t = s.slot_positions(l).unwrap().expect("budgeted policy");
            let per_row = t.len() / s.batch();
            t[row * per_row..(row + 1) * per_row].to_vec()
        })
        .collect()
}

fn check_against_reference(family: &str, kv: KvPolicy, storage: KvStorage) {
    let (p, w) = program_of(family, kv, storage);
    let kv = format!("{family} {kv}");
    let mut s = session(&p, &w);
    let reqs = staggered_requests();
    let (out, logits) = s.prefill(&reqs, true).unwrap();
    let (layers, heads) = (layers(&p), p.spec.arch.dims().num_kv_heads as usize);
    let mut eager: Vec<Eager> = reqs
        .iter()
        .map(|_| Eager::new(&p, Reference::new(&p, &w)))
        .collect();
    let (mut tokens, mut done) = (out.tokens.clone(), out.done.clone());
    for (i, req) in reqs.iter().enumerate() {
        let want = eager[i].prefill(&req.prompt);
        let diff = max_diff(&logits[i], &want);
        assert!(diff < TOL, "{kv}: row {i} prefill logits differ by {diff}");
        assert_eq!(tokens[i], argmax(&want), "{kv}: row {i}");
    }
    for step in 0..=STEPS {
        for (i, e) in eager.iter().enumerate() {
            for l in 0..layers {
                for h in 0..heads {
                    assert_eq!(
                        kept(&s, i, l, h),
                        e.kept(l as usize, h),
                        "{kv}: row {i} layer {l} kv head {h} after {step} decode steps"
                    );
                }
            }
        }
        if step == STEPS {
            break;
        }
        let idle_before: Vec<Option<Vec<Vec<i32>>>> = (0..reqs.len())
            .map(|i| done[i].then(|| raw_tables(&s, i, layers)))
            .collect();
        let (out, logits) = s.step_logits().unwrap();
        for (i, e) in eager.iter_mut().enumerate() {
            if let Some(before) = &idle_before[i] {
                // An idle row's slots do not move, even when the others evict.
                assert_eq!(&raw_tables(&s, i, layers), before, "{kv}: idle row {i}");
                continue;
            }
            // Teacher-forced with the graph's own token.
            let want = e.run(&[tokens[i]], true);
            let diff = max_diff(&logits[i], &want);
            assert!(
                diff < TOL,
                "{kv}: row {i} step {step} logits differ by {diff}"
            );
        }
        (tokens, done) = (out.tokens, out.done);
    }
    assert_eq!(done, vec![true; 3], "{kv}: every row finished");
}

#[test]
fn a_padded_row_keeps_what_it_keeps_alone() {
    for kv in small() {
        let (p, w) = program(kv);
        let mut s = session(&p, &w);
        let reqs = requests();
        let batched = s.generate(&reqs, &mut |_, _| {}).unwrap();
        let layers = layers(&p);
        let table: Vec<Vec<Vec<i32>>> = (0..reqs.len())
            .map(|i| {
                (0..layers)
                    .flat_map(|l| [kept(&s, i, l, 0), kept(&s, i, l, 1)])
                    .collect()
            })
            .collect();
        let positions = s.positions().unwrap();
        for (i, req) in reqs.iter().enumerate() {
            // Padding never enters: every kept position is one of the row's tokens.
            for set in &table[i] {
                assert!(
                    set.iter().all(|&x| x < positions[i]),
                    "{kv}: row {i} keeps a position past its end: {set:?}"
                );
            }
            let alone = s
                .generate(std::slice::from_ref(req), &mut |_, _| {})
                .unwrap();
            assert_eq!(alone[0], batched[i], "{kv}: row {i}");
            let alone_sets: Vec<Vec<i32>> = (0..layers)
                .flat_map(|l| [kept(&s, 0, l, 0), kept(&s, 0, l, 1)])
                .collect();
            assert_eq!(alone_sets, table[i], "{kv}: row {i}");
        }
    }
}

#[test]
fn a_budget_that_holds_the_sequence_gives_dense_logits() {
    // The longest row holds 21 prompt + 8 decoded tokens <= 32.
    let (dense, w) = tiny(Overrides::default());
    let big = [
        KvPolicy::Window { size: 32 },
        KvPolicy::SinkWindow {
            sinks: 4,
            window: 28,
        },
        KvPolicy::H2o {
            budget: 32,
            recent: 4,
        },
        KvPolicy::Tova { budget: 32 },
        KvPolicy::SnapKv {
            budget: 32,
            window: 4,
            pool: 3,
        },
        KvPolicy::Random {
            budget: 32,
            seed: 5,
        },
    ];
    let reqs = requests();
    let mut d = session(&dense, &w);
    let (_, want_prefill) = d.prefill(&reqs, true).unwrap();
    let mut want_steps = vec![];
    for _ in 0..STEPS {
        want_steps.push(d.step_logits().unwrap());
    }
    for kv in big {
        let (p, _) = program(kv);
        let mut s = session(&p, &w);
        let (_, got) = s.prefill(&reqs, true).unwrap();
        let mut worst = 0.0f32;
        let mut compare = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            for (x, y) in a.iter().zip(b) {
                for (u, v) in x.iter().zip(y) {
                    worst = worst.max((u - v).abs());
                }
            }
        };
        compare(&got, &want_prefill);
        for (out, logits) in &want_steps {
            let (o, l) = s.step_logits().unwrap();
            assert_eq!(o.tokens, out.tokens, "{kv}");
            compare(&l, logits);
        }
        // Same keys, another slot order: only the summation order differs.
        assert!(worst < 1e-5, "{kv}: logits differ from dense by {worst}");
    }
}
