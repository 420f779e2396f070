//! Differential tests on the tiny random-weight model: the compiled graphs, replayed by the
//! Burn executor, against a plain float64 Llama forward pass written here (no cache, no
//! padding, one sequence at a time). Cheap enough to exercise every op, padding, chunked
//! prefill, idle rows, decode and sampling.

use std::collections::BTreeMap;
use std::path::Path;

use kvc_compiler::ir::Program;
use kvc_compiler::spec::{Arch, LlamaConfig, Sampler};
use kvc_compiler::{ModelSpec, Overrides, compile};
use kvc_runtime::random::{HostTensor, random_param};
use kvc_runtime::session::{Finish, Request, Sampling, Session, bind_params};
use kvc_runtime::{Backend, device};

fn tiny(o: Overrides) -> (Program, BTreeMap<String, HostTensor>) {
    tiny_stopping_at(o, &[])
}

fn tiny_stopping_at(o: Overrides, stops: &[u32]) -> (Program, BTreeMap<String, HostTensor>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama.ron");
    let mut spec = ModelSpec::load(&path)
        .unwrap()
        .with_overrides(&o, "tiny")
        .unwrap();
    spec.stop_tokens = stops.to_vec();
    let program = compile(&spec).unwrap();
    let weights = program
        .params
        .iter()
        .map(|d| (d.name.clone(), random_param(d, 7)))
        .collect();
    (program, weights)
}

fn session(program: &Program, weights: &BTreeMap<String, HostTensor>) -> Session {
    let dev = device(Backend::Flex).unwrap();
    let mut w = weights.clone();
    let params = bind_params(program, &mut w, &dev).unwrap();
    Session::new(program.clone(), params, dev).unwrap()
}

/// Float64 reference forward pass: logits after every position of `ids`.
struct Reference<'a> {
    c: LlamaConfig,
    w: &'a BTreeMap<String, HostTensor>,
}

impl Reference<'_> {
    fn new<'a>(p: &Program, w: &'a BTreeMap<String, HostTensor>) -> Reference<'a> {
        let Arch::Llama(c) = &p.spec.arch;
        Reference { c: c.clone(), w }
    }

    fn t(&self, name: &str) -> &HostTensor {
        &self.w[name]
    }

    fn linear(&self, x: &[f64], name: &str) -> Vec<f64> {
        let t = self.t(name);
        let (n, k) = (t.shape[0], t.shape[1]);
        (0..n)
            .map(|o| (0..k).map(|i| x[i] * t.data[o * k + i] as f64).sum())
            .collect()
    }

    fn rms(&self, x: &[f64], name: &str) -> Vec<f64> {
        let w = &self.t(name).data;
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + self.c.rms_norm_eps as f64).sqrt();
        x.iter().zip(w).map(|(v, g)| v * inv * *g as f64).collect()
    }

    fn rope(&self, x: &mut [f64], pos: usize) {
        let d = self.c.head_dim as usize;
        for head in x.chunks_mut(d) {
            for i in 0..d / 2 {
                let a = pos as f64 * (self.c.rope_theta as f64).powf(-2.0 * i as f64 / d as f64);
                let (x1, x2) = (head[i], head[i + d / 2]);
                head[i] = x1 * a.cos() - x2 * a.sin();
                head[i + d / 2] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }

    /// Greedy continuation of `prompt` by `n` tokens, recomputing every position.
    fn greedy(&self, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        for _ in 0..n {
            let next = argmax(self.forward(&seq).last().unwrap());
            seq.push(next);
        }
        seq.split_off(prompt.len())
    }

    fn forward(&self, ids: &[u32]) -> Vec<Vec<f64>> {
        let c = &self.c;
        let (h, d) = (c.hidden_size as usize, c.head_dim as usize);
        let (hq, hkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let emb = self.t("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = ids
            .iter()
            .map(|&t| {
                emb.data[t as usize * h..(t as usize + 1) * h]
                    .iter()
                    .map(|&v| v as f64)
                    .collect()
            })
            .collect();
        for l in 0..c.num_layers {
            let p = |n: &str| format!("model.layers.{l}.{n}.weight");
            let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
            for (pos, x) in xs.iter().enumerate() {
                let hn = self.rms(x, &p("input_layernorm"));
                let mut q = self.linear(&hn, &p("self_attn.q_proj"));
                let mut k = self.linear(&hn, &p("self_attn.k_proj"));
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                qs.push(q);
                ks.push(k);
                vs.push(self.linear(&hn, &p("self_attn.v_proj")));
            }
            for (pos, x) in xs.iter_mut().enumerate() {
                let mut att = vec![0.0; hq * d];
                for head in 0..hq {
                    let kvh = head / (hq / hkv);
                    let q = &qs[pos][head * d..(head + 1) * d];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|s| {
                            let k = &ks[s][kvh * d..(kvh + 1) * d];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (s, w) in e.iter().enumerate() {
                        for j in 0..d {
                            att[head * d + j] += w / z * vs[s][kvh * d + j];
                        }
                    }
                }
                let o = self.linear(&att, &p("self_attn.o_proj"));
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let hn = self.rms(x, &p("post_attention_layernorm"));
                let g = self.linear(&hn, &p("mlp.gate_proj"));
                let u = self.linear(&hn, &p("mlp.up_proj"));
                let m: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let dn = self.linear(&m, &p("mlp.down_proj"));
                x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
            }
        }
        let head = if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        xs.iter()
            .map(|x| self.linear(&self.rms(x, "model.norm.weight"), head))
            .collect()
    }
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn argmax(v: &[f64]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// One request per test prompt.
fn requests(max_new_tokens: usize, sampling: Sampling) -> Vec<Request> {
    prompts()
        .into_iter()
        .map(|prompt| Request {
            prompt,
            max_new_tokens,
            sampling,
        })
        .collect()
}

fn prompts() -> Vec<Vec<u32>> {
    // Lengths 3, 8 (= T) and 13 (two chunks of T = 8).
    vec![
        vec![5, 17, 200],
        (30..38).collect(),
        (100..113).map(|t| t * 2 % 256).collect(),
    ]
}

const TOL: f64 = 1e-4;

#[test]
fn padded_chunked_prefill_matches_reference_per_row() {
    let (program, w) = tiny(Overrides::default());
    let r = Reference::new(&program, &w);
    let mut s = session(&program, &w);
    let reqs: Vec<Request> = requests(4, Sampling::default());
    let (out, logits) = s.prefill(&reqs, true).unwrap();
    for (i, req) in reqs.iter().enumerate() {
        let want = r.forward(&req.prompt);
        let last = want.last().unwrap();
        let diff = max_diff(&logits[i], last);
        assert!(diff < TOL, "row {i}: max |logit diff| {diff}");
        assert_eq!(out.tokens[i], argmax(last), "row {i}");
        assert!(!out.done[i]);
    }
    assert_eq!(s.positions().unwrap(), vec![3, 8, 13]);
    assert_eq!(s.limits().unwrap(), vec![6, 11, 16]);
}

#[test]
fn greedy_decode_matches_reference_and_stops_at_the_limit() {
    let (program, w) = tiny(Overrides::default());
    let r = Reference::new(&program, &w);
    let mut s = session(&program, &w);
    let reqs: Vec<Request> = prompts()
        .into_iter()
        .zip([6, 2, 9])
        .map(|(p, n)| Request {
            prompt: p,
            max_new_tokens: n,
            sampling: Sampling::default(),
        })
        .collect();
    let got = s.generate(&reqs, &mut |_, _| {}).unwrap();
    for (i, req) in reqs.iter().enumerate() {
        assert_eq!(
            got[i].ids,
            r.greedy(&req.prompt, req.max_new_tokens),
            "row {i}"
        );
    }
    // Each row stops at its own position: prompt + max_new - 1 tokens in the cache.
    assert_eq!(s.positions().unwrap(), vec![3 + 5, 8 + 1, 13 + 8]);
}

#[test]
fn teacher_forced_decode_matches_reference_at_every_position() {
    let (program, w) = tiny(Overrides::default());
    let r = Reference::new(&program, &w);
    let mut s = session(&program, &w);
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 256).collect();
    let got = s.score(&ids).unwrap();
    let want = r.forward(&ids);
    assert_eq!(got.len(), ids.len());
    for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
        let diff = max_diff(g, w);
        assert!(diff < TOL, "position {pos}: max |logit diff| {diff}");
    }
}

#[test]
fn a_row_gives_the_same_logits_alone_and_padded_in_a_batch() {
    let (program, w) = tiny(Overrides::default());
    let mut s = session(&program, &w);
    let reqs: Vec<Request> = requests(5, Sampling::default());
    let (_, batched) = s.prefill(&reqs, true).unwrap();
    let batched_ids = s.generate(&reqs, &mut |_, _| {}).unwrap();
    for (i, req) in reqs.iter().enumerate() {
        // Alone, in row 0, with the other rows idle.
        let (_, alone) = s.prefill(std::slice::from_ref(req), true).unwrap();
        let diff = alone[0]
            .iter()
            .zip(&batched[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "row {i}: alone vs batched differ by {diff}");
        let alone_ids = s
            .generate(std::slice::from_ref(req), &mut |_, _| {})
            .unwrap();
        assert_eq!(alone_ids[0], batched_ids[i], "row {i}");
    }
}

#[test]
fn chunked_prefill_equals_one_wide_prefill() {
    let (narrow_p, w) = tiny(Overrides::default());
    let (wide_p, _) = tiny(Overrides {
        prefill_len: Some(16),
        ..Overrides::default()
    });
    let req = vec![Request {
        prompt: prompts()[2].clone(),
        max_new_tokens: 6,
        sampling: Sampling::default(),
    }];
    let mut narrow = session(&narrow_p, &w);
    let mut wide = session(&wide_p, &w);
    let (_, a) = narrow.prefill(&req, true).unwrap();
    let (_, b) = wide.prefill(&req, true).unwrap();
    let diff = a[0]
        .iter()
        .zip(&b[0])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "chunked vs wide prefill differ by {diff}");
    let ga = narrow.generate(&req, &mut |_, _| {}).unwrap();
    let gb = wide.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(ga, gb);
}

#[test]
fn requests_that_do_not_fit_are_refused_with_the_fix() {
    let (program, w) = tiny(Overrides::default());
    let mut s = session(&program, &w);
    let long = Request {
        prompt: vec![1; 30],
        max_new_tokens: 10,
        sampling: Sampling::default(),
    };
    let err = s.prefill(&[long], false).unwrap_err().to_string();
    assert!(
        err.contains("39 cache slots") && err.contains("--cache-len 39"),
        "{err}"
    );
    let four = vec![
        Request {
            prompt: vec![1],
            max_new_tokens: 1,
            sampling: Sampling::default()
        };
        4
    ];
    let err = s.prefill(&four, false).unwrap_err().to_string();
    assert!(err.contains("--batch 4"), "{err}");
    let greedy_only = Request {
        prompt: vec![1],
        max_new_tokens: 1,
        sampling: Sampling {
            temperature: 0.8,
            ..Sampling::default()
        },
    };
    let err = s.prefill(&[greedy_only], false).unwrap_err().to_string();
    assert!(err.contains("compiled with the greedy sampler"), "{err}");
}

#[test]
fn sampling_is_seeded_and_respects_top_k() {
    let (program, w) = tiny(Overrides {
        sampler: Some(Sampler::Sample),
        ..Overrides::default()
    });
    let r = Reference::new(&program, &w);
    let mut s = session(&program, &w);
    let sampling = Sampling {
        temperature: 1.5,
        top_k: 3,
        top_p: 1.0,
    };
    let reqs: Vec<Request> = requests(10, sampling);
    s.set_seed(42);
    let a = s.generate(&reqs, &mut |_, _| {}).unwrap();
    let b = s.generate(&reqs, &mut |_, _| {}).unwrap();
    assert_eq!(a, b, "same seed, same tokens");
    s.set_seed(43);
    let c = s.generate(&reqs, &mut |_, _| {}).unwrap();
    assert_ne!(
        a, c,
        "another seed should change some of 30 tokens drawn at temperature 1.5"
    );
    for (req, got) in reqs.iter().zip(&a) {
        let mut seq = req.prompt.clone();
        for &t in &got.ids {
            let logits = r.forward(&seq).pop().unwrap();
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
            assert!(
                order[..3].contains(&(t as usize)),
                "token {t} is not in the top 3 {:?}",
                &order[..3]
            );
            seq.push(t);
        }
    }
    // Rows with temperature 0 in a sampling program are greedy.
    let greedy: Vec<Request> = requests(5, Sampling::default());
    let (gp, _) = tiny(Overrides::default());
    let mut g = session(&gp, &w);
    assert_eq!(
        s.generate(&greedy, &mut |_, _| {}).unwrap(),
        g.generate(&greedy, &mut |_, _| {}).unwrap()
    );
}

#[test]
fn f16_weights_stay_close_to_the_reference() {
    use kvc_compiler::spec::DTypeSpec;
    let o = Overrides {
        weight_dtype: Some(DTypeSpec::F16),
        ..Overrides::default()
    };
    let (program, w) = tiny(o);
    // The reference sees the same f16-rounded weights (matrices only; norms stay f32).
    let rounded: BTreeMap<String, HostTensor> = w
        .iter()
        .map(|(k, t)| {
            let mut t = t.clone();
            if t.shape.len() == 2 {
                t.data
                    .iter_mut()
                    .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
            }
            (k.clone(), t)
        })
        .collect();
    let r = Reference::new(&program, &rounded);
    let mut s = session(&program, &w);
    let reqs: Vec<Request> = requests(1, Sampling::default());
    let (_, logits) = s.prefill(&reqs, true).unwrap();
    for (i, req) in reqs.iter().enumerate() {
        let diff = max_diff(&logits[i], r.forward(&req.prompt).last().unwrap());
        // Activations are rounded to f16 (11-bit mantissa) before every product.
        assert!(diff < 2e-2, "row {i}: max |logit diff| {diff}");
    }
}

#[test]
fn stop_tokens_end_a_row_without_being_emitted() {
    let (program, w) = tiny(Overrides::default());
    let r = Reference::new(&program, &w);
    let prompt = prompts()[0].clone();
    let want = r.greedy(&prompt, 4);
    // Stop at the third generated token: the first two are emitted, then the row ends
    // while the other row (no stop in sight) runs to its limit.
    let stop = want[2];
    assert!(!want[..2].contains(&stop), "pick another prompt: {want:?}");
    let (program, _) = tiny_stopping_at(Overrides::default(), &[stop]);
    let mut s = session(&program, &w);
    let reqs = vec![
        Request {
            prompt: prompt.clone(),
            max_new_tokens: 10,
            sampling: Sampling::default(),
        },
        Request {
            prompt: vec![9, 9, 9],
            max_new_tokens: 1,
            sampling: Sampling::default(),
        },
    ];
    let got = s.generate(&reqs, &mut |_, _| {}).unwrap();
    assert_eq!(got[0].ids, want[..2]);
    assert_eq!(got[0].finish, Finish::Stop);
    assert_eq!(got[1].ids.len(), 1);
    assert_eq!(got[1].finish, Finish::Length);
    // max_new_tokens = 1: done right after prefill, nothing written beyond the prompt.
    assert_eq!(s.positions().unwrap()[1], 3);
}

#[test]
fn a_request_may_fill_the_cache_exactly() {
    let (program, w) = tiny(Overrides::default());
    let r = Reference::new(&program, &w);
    let mut s = session(&program, &w);
    // 13 prompt tokens + 20 new tokens = 32 slots = S (the last token is never written).
    let prompt = prompts()[2].clone();
    let req = Request {
        prompt: prompt.clone(),
        max_new_tokens: 20,
        sampling: Sampling::default(),
    };
    let got = s
        .generate(std::slice::from_ref(&req), &mut |_, _| {})
        .unwrap();
    assert_eq!(got[0].ids, r.greedy(&prompt, 20));
    assert_eq!(s.positions().unwrap()[0], 32);
    let too_long = Request {
        max_new_tokens: 21,
        ..req
    };
    assert!(s.prefill(&[too_long], false).is_err());
}
