//! Snapshot tests of the text form: both graphs of every model in `models/`, the memory
//! plan, and the one-line error of every invalid spec in `fixtures/invalid/`.

use std::path::{Path, PathBuf};

use kvc_compiler::{MemoryPlan, ModelSpec, Overrides, compile, compile_file};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn ron_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixture directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_model_compiles_to_snapshotted_graphs() {
    let models = ron_files(&repo().join("models"));
    assert!(
        models.len() >= 2,
        "expected at least two models, found {models:?}"
    );
    for path in models {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let p = compile_file(&path, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        insta::assert_snapshot!(
            format!("{name}.prefill"),
            p.display_graph(&p.prefill).to_string()
        );
        insta::assert_snapshot!(
            format!("{name}.decode"),
            p.display_graph(&p.decode).to_string()
        );
        let header = format!(
            "{}\n{}\n{}",
            p.signature(&p.prefill),
            p.signature(&p.decode),
            MemoryPlan::of(&p)
        );
        insta::assert_snapshot!(format!("{name}.plan"), header);
    }
}

#[test]
fn invalid_specs_give_one_line_errors() {
    let dir = repo().join("compiler/tests/fixtures/invalid");
    let files = ron_files(&dir);
    assert!(
        files.len() >= 10,
        "expected the invalid-spec fixtures, found {}",
        files.len()
    );
    for path in files {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let shown = format!("invalid/{name}.ron");
        let src = std::fs::read_to_string(&path).unwrap();
        let err = ModelSpec::parse(&src, &shown).expect_err(&name);
        let text = err.to_string();
        assert!(
            !text.contains('\n'),
            "{name}: error is not one line: {text}"
        );
        assert!(
            text.starts_with(&format!("{shown}:")),
            "{name}: error does not name the file: {text}"
        );
        insta::assert_snapshot!(format!("invalid.{name}"), text);
    }
}

#[test]
fn overrides_change_only_shapes() {
    let path = repo().join("models/smollm2-135m.ron");
    let base = compile_file(&path, &Overrides::default()).unwrap();
    let o = Overrides {
        batch: Some(8),
        prefill_len: Some(128),
        cache_len: Some(1024),
        ..Overrides::default()
    };
    let big = compile_file(&path, &o).unwrap();
    assert_eq!(big.config.batch, 8);
    assert_eq!(big.prefill.nodes.len(), base.prefill.nodes.len());
    assert_eq!(big.decode.nodes.len(), base.decode.nodes.len());
    for (a, b) in base.graphs().into_iter().zip(big.graphs()) {
        for (x, y) in a.nodes.iter().zip(&b.nodes) {
            assert_eq!(x.op.name(), y.op.name());
            assert_eq!(x.op.args(), y.op.args());
            assert_eq!(x.ty.dtype, y.ty.dtype);
        }
    }
    let k0 = &big.state[big.state_id("k.0").unwrap().0 as usize];
    assert_eq!(k0.ty.shape, vec![8, 3, 1024, 64]);
    let bad = Overrides {
        prefill_len: Some(2048),
        ..Overrides::default()
    };
    let err = compile_file(&path, &bad).unwrap_err().to_string();
    assert!(
        err.contains("compile.prefill_len") && err.contains("2048"),
        "{err}"
    );
}

#[test]
fn compilation_is_deterministic_and_round_trips() {
    let path = repo().join("models/tiny-llama.ron");
    let a = compile_file(&path, &Overrides::default()).unwrap();
    let b = compile_file(&path, &Overrides::default()).unwrap();
    assert_eq!(a.to_string(), b.to_string());
    let json = serde_json::to_string(&a).unwrap();
    let back: kvc_compiler::ir::Program = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
    kvc_compiler::verify::verify(&back, "after round trip").unwrap();
}

#[test]
fn decode_graph_has_no_host_inputs_and_fixed_shapes() {
    let spec = ModelSpec::load(&repo().join("models/tiny-llama.ron")).unwrap();
    let p = compile(&spec).unwrap();
    assert!(p.decode.inputs.is_empty());
    let names: Vec<&str> = p.prefill.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["tokens", "len", "limit", "restart"]);
    assert_eq!(p.prefill.inputs[0].ty.shape, vec![3, 8]);
    let out = |g: &kvc_compiler::ir::Graph, n: &str| {
        let o = g.outputs.iter().find(|o| o.name == n).unwrap();
        g.ty(o.value).to_string()
    };
    assert_eq!(out(&p.prefill, "logits"), "f32[3,256]");
    assert_eq!(out(&p.decode, "logits"), "f32[3,256]");
    assert_eq!(out(&p.decode, "token"), "i32[3]");
    // Every state variable is written back by prefill; decode writes all but `limit`.
    assert_eq!(p.prefill.updates.len(), p.state.len());
    assert_eq!(p.decode.updates.len(), p.state.len() - 1);
}

#[test]
fn sampling_sampler_reads_per_row_settings_from_state() {
    let path = repo().join("models/tiny-llama.ron");
    let o = Overrides {
        sampler: Some(kvc_compiler::spec::Sampler::Sample),
        ..Overrides::default()
    };
    let p = compile_file(&path, &o).unwrap();
    for name in ["temperature", "top_k", "top_p", "uniform"] {
        assert!(p.state_id(name).is_some(), "missing state {name}");
    }
    assert!(p.decode.inputs.is_empty());
    insta::assert_snapshot!(
        "tiny-llama.sample.decode",
        p.display_graph(&p.decode).to_string()
    );
}

#[test]
fn f16_weights_halve_the_matrices_only() {
    let path = repo().join("models/smollm2-135m.ron");
    let f32 = compile_file(&path, &Overrides::default()).unwrap();
    let o = Overrides {
        weight_dtype: Some(kvc_compiler::spec::DTypeSpec::F16),
        ..Overrides::default()
    };
    let f16 = compile_file(&path, &o).unwrap();
    let norms: u64 = f32
        .params
        .iter()
        .filter(|p| p.ty.shape.len() == 1)
        .map(|p| p.ty.size_bytes())
        .sum();
    assert_eq!(norms, 61 * 576 * 4);
    let (a, b) = (MemoryPlan::of(&f32).weights, MemoryPlan::of(&f16).weights);
    assert_eq!(b, (a - norms) / 2 + norms);
    let q = f16
        .params
        .iter()
        .find(|p| p.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.ty.to_string(), "f16[576,576]");
    assert_eq!(f16.prefill.nodes.len(), f32.prefill.nodes.len());
}

/// `weight_dtype: Native` with the storage SmolLM2's GGUF has (token embedding Q8_0, every
/// other matrix Q4_1): the text form shows the block types and the memory plan counts
/// their bytes, 34/32 and 20/32 bytes per value.
#[test]
fn native_weights_keep_the_file_blocks() {
    use kvc_compiler::ir::DType;
    use kvc_compiler::lower::WeightTypes;
    let path = repo().join("models/smollm2-135m.ron");
    let spec = ModelSpec::load(&path).unwrap();
    let f32 = compile(&spec).unwrap();
    let types: WeightTypes = f32
        .params
        .iter()
        .map(|p| {
            let dt = match (p.ty.shape.len(), p.name.as_str()) {
                (1, _) => DType::F32,
                (_, "model.embed_tokens.weight") => DType::Q8_0,
                _ => DType::Q4_1,
            };
            (p.name.clone(), dt)
        })
        .collect();
    let native = kvc_compiler::compile_with(&spec, &types).unwrap();
    let header = format!(
        "{}\n{}\n{}",
        native.signature(&native.decode),
        native
            .params
            .iter()
            .take(12)
            .map(|p| format!("{}: {}", p.name, p.ty))
            .collect::<Vec<_>>()
            .join("\n"),
        MemoryPlan::of(&native)
    );
    insta::assert_snapshot!("smollm2-135m.native.plan", header);
    let embed = 49152u64 * 576 / 32 * 34;
    let norms = 61 * 576 * 4;
    let matrices = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536) / 32 * 20;
    assert_eq!(MemoryPlan::of(&native).weights, embed + norms + matrices);
    // The same graph as with f32 weights, only the parameter types differ.
    assert_eq!(native.decode.nodes.len(), f32.decode.nodes.len());
    // A quantized norm gain is refused where it is read.
    let mut quantized = native.clone();
    quantized.params[1].ty.dtype = DType::Q4_1;
    for g in [&mut quantized.prefill, &mut quantized.decode] {
        for n in g.nodes.iter_mut() {
            if let kvc_compiler::ir::Op::Param(id) = n.op
                && id.0 == 1
            {
                n.ty.dtype = DType::Q4_1;
            }
        }
    }
    let err = kvc_compiler::verify::verify(&quantized, "test").unwrap_err();
    assert!(err.to_string().contains("rms_norm"), "{err}");
}
