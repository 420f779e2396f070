//! Every tensor of two real GGUF files (Qwen2.5-Coder-0.5B and Gemma 3 270M, both
//! Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors), dequantized with
//! [`GgufFile::tensor_f32`], against checksums of the same tensors dequantized by the `gguf`
//! Python package (`tests/fixtures/gguf/`, see PROVENANCE.md there).

use std::path::Path;

use kvc_runtime::load::gguf::GgufFile;
use serde_json::Value;

use crate::common::model_path;

/// `sum` and `abs_sum` of the fixture are exactly rounded (math.fsum). The sums here add
/// runs of [`RUN`] values in plain f64 (each run's rounding error is at most `RUN · u` of its
/// `Σ|x|`, u = 2^-53) and the run sums with Neumaier compensation (error about
/// `2u|sum| + 2n u² Σ|x|`, negligible for n ≤ 1.4e8 elements): in all at most 3e-14 of the
/// tensor's `Σ|x|` (the differences seen are about 2e-16). The tolerance, 1e-12 of `Σ|x|`,
/// is 30 times that bound, and for every tensor of these files over 100 times smaller than
/// 1/64 of its largest magnitude (one step of a 6-bit quantization of it), so a value
/// decoded a step wrong fails the check.
const SUM_TOLERANCE: f64 = 1e-12;

/// Values summed in plain f64 before compensated accumulation (a short inner loop keeps
/// this unoptimized test build fast).
const RUN: usize = 256;

/// Adds `x` to the compensated sum `(sum, c)` (Neumaier).
fn add(sum: &mut f64, c: &mut f64, x: f64) {
    let t = *sum + x;
    *c += if sum.abs() >= x.abs() {
        (*sum - t) + x
    } else {
        (x - t) + *sum
    };
    *sum = t;
}

/// The sum of the values and the sum of their absolute values.
fn sums(values: &[f32]) -> (f64, f64) {
    let (mut sum, mut sum_c, mut abs, mut abs_c) = (0.0, 0.0, 0.0, 0.0);
    for run in values.chunks(RUN) {
        let (mut s, mut a) = (0.0f64, 0.0f64);
        for &v in run {
            let x = f64::from(v);
            s += x;
            a += x.abs();
        }
        add(&mut sum, &mut sum_c, s);
        add(&mut abs, &mut abs_c, a);
    }
    (sum + sum_c, abs + abs_c)
}

fn check_model(model: &str) {
    let fixture_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/gguf/{model}-tensor-sums.json"));
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture_path).unwrap()).unwrap();
    let want = fixture["tensors"].as_array().unwrap();

    let file = GgufFile::open(model_path(model)).unwrap();
    let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, want_names, "{model}: tensor names and order");

    for (info, want) in file.tensors().iter().zip(want) {
        let name = &info.name;
        assert_eq!(
            info.ty.to_string(),
            want["type"].as_str().unwrap(),
            "{name}"
        );
        let dims: Vec<u64> = want["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(info.dims, dims, "{name}");
        assert_eq!(
            info.n_elements(),
            want["n_elements"].as_u64().unwrap(),
            "{name}"
        );

        let (shape, values) = file.tensor_f32(name).unwrap();
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");

        let (sum, abs_sum) = sums(&values);
        let want_sum = want["sum"].as_f64().unwrap();
        let want_abs = want["abs_sum"].as_f64().unwrap();
        let tol = SUM_TOLERANCE * want_abs;
        assert!(
            (sum - want_sum).abs() <= tol && (abs_sum - want_abs).abs() <= tol,
            "{name} ({}): sum {sum} abs_sum {abs_sum}, want {want_sum} and {want_abs} (±{tol})",
            info.ty
        );

        for sample in want["samples"].as_array().unwrap() {
            let i = sample[0].as_u64().unwrap() as usize;
            // Each sample is an f32 written as the f64 of equal value: the cast is exact.
            let v = sample[1].as_f64().unwrap() as f32;
            assert_eq!(
                values[i].to_bits(),
                v.to_bits(),
                "{name} ({}) element {i}: got {}, want {v}",
                info.ty,
                values[i]
            );
        }
    }
}

#[test]
fn qwen2_5_coder_0_5b_tensors_match_the_gguf_python_package() {
    check_model("qwen2.5-coder-0.5b");
}

#[test]
fn gemma3_270m_tensors_match_the_gguf_python_package() {
    check_model("gemma3-270m");
}
