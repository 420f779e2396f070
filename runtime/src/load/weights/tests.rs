//! The weights loader's unit tests: name maps, RoPE un-permutation, GGUF files built in memory.

use super::*;
use kvc_compiler::family::Family;

use crate::load::gguf::GgmlType;
use crate::load::gguf::test_writer::{GgufWriter, str_array};

/// The converter's forward permutation written as the literal
/// reshape(n_head, 2, half, in).swapaxes(1, 2) index computation.
fn permute_like_converter(w: &[f32], out: usize, inner: usize, n_head: usize) -> Vec<f32> {
    let half = out / n_head / 2;
    let mut res = vec![0.0; w.len()];
    // Result index (h, i, t, c) in shape (n_head, half, 2, in) reads the
    // source at (h, t, i, c) in shape (n_head, 2, half, in).
    for h in 0..n_head {
        for i in 0..half {
            for t in 0..2 {
                for c in 0..inner {
                    let dst = ((h * half + i) * 2 + t) * inner + c;
                    let src = ((h * 2 + t) * half + i) * inner + c;
                    res[dst] = w[src];
                }
            }
        }
    }
    res
}

#[test]
fn unpermute_matches_index_formula_and_inverts_converter() {
    let (n_head, head_dim, inner) = (3, 8, 5);
    let out = n_head * head_dim;
    let hf: Vec<f32> = (0..out * inner).map(|i| i as f32).collect();
    let gguf = permute_like_converter(&hf, out, inner, n_head);
    // Spot-check the forward layout: head 1, GGUF row 3 = pair 1, second
    // half -> HF row head_dim + half + 1.
    let g_row = head_dim + 3;
    let hf_row = head_dim + head_dim / 2 + 1;
    assert_eq!(gguf[g_row * inner], hf[hf_row * inner]);

    let t = HostTensor {
        shape: vec![out, inner],
        data: gguf,
        quant: None,
    };
    let back = unpermute_qk("q", &t, n_head).unwrap();
    assert_eq!(back.shape, vec![out, inner]);
    assert_eq!(back.data, hf);
    // Explicit formula: HF row r = h*hd + t*hd/2 + i comes from GGUF row h*hd + 2i + t.
    for r in 0..out {
        let (h, w) = (r / head_dim, r % head_dim);
        let (tt, i) = (w / (head_dim / 2), w % (head_dim / 2));
        let src = h * head_dim + 2 * i + tt;
        assert_eq!(
            back.data[r * inner..(r + 1) * inner],
            t.data[src * inner..(src + 1) * inner]
        );
    }
}

#[test]
fn unpermute_rejects_bad_shapes() {
    let t = HostTensor {
        shape: vec![6, 2],
        data: vec![0.0; 12],
        quant: None,
    };
    assert!(matches!(
        unpermute_qk("k", &t, 2),
        Err(WeightsError::BadShape { .. })
    ));
    let t = HostTensor {
        shape: vec![12],
        data: vec![0.0; 12],
        quant: None,
    };
    assert!(matches!(
        unpermute_qk("k", &t, 2),
        Err(WeightsError::BadShape { .. })
    ));
}

/// Every block format maps to its IR storage type and back; other types are not blocks.
#[test]
fn block_formats_map_to_ir_types_and_back() {
    for b in kvc_compiler::blocks::Block::ALL {
        let ty = GgmlType::from_id(b.format().ggml_type).expect("known id");
        assert_eq!(ir_dtype(ty), DType::of_block(b), "{ty}");
        assert_eq!(ggml_block_type(DType::of_block(b)), Some(ty));
    }
    assert_eq!(ir_dtype(GgmlType::Q8_K), DType::F32);
    assert_eq!(ir_dtype(GgmlType::F16), DType::F16);
    assert_eq!(ggml_block_type(DType::F16), None);
}

#[test]
fn family_specific_gguf_names_map_to_their_hf_names() {
    use Family::{Gemma3, Llama, Qwen2};
    let cases = [
        (
            Qwen2,
            "blk.2.attn_q.bias",
            Some("model.layers.2.self_attn.q_proj.bias"),
        ),
        (
            Qwen2,
            "blk.2.attn_v.bias",
            Some("model.layers.2.self_attn.v_proj.bias"),
        ),
        (Llama, "blk.2.attn_q.bias", None),
        (
            Qwen2,
            "blk.0.ffn_norm.weight",
            Some("model.layers.0.post_attention_layernorm.weight"),
        ),
        (
            Gemma3,
            "blk.0.ffn_norm.weight",
            Some("model.layers.0.pre_feedforward_layernorm.weight"),
        ),
        (
            Gemma3,
            "blk.0.post_attention_norm.weight",
            Some("model.layers.0.post_attention_layernorm.weight"),
        ),
        (
            Gemma3,
            "blk.0.post_ffw_norm.weight",
            Some("model.layers.0.post_feedforward_layernorm.weight"),
        ),
        (
            Gemma3,
            "blk.7.attn_k_norm.weight",
            Some("model.layers.7.self_attn.k_norm.weight"),
        ),
        (Llama, "blk.7.attn_k_norm.weight", None),
    ];
    for (arch, g, h) in cases {
        assert_eq!(arch.checkpoint_name(g).as_deref(), h, "{arch:?} {g}");
    }
}

#[test]
fn gguf_names_map_to_hf() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
        ),
        (
            "blk.12.attn_q.weight",
            "model.layers.12.self_attn.q_proj.weight",
        ),
        (
            "blk.3.attn_k.weight",
            "model.layers.3.self_attn.k_proj.weight",
        ),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
        ),
        (
            "blk.3.attn_output.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        (
            "blk.29.ffn_norm.weight",
            "model.layers.29.post_attention_layernorm.weight",
        ),
        (
            "blk.1.ffn_gate.weight",
            "model.layers.1.mlp.gate_proj.weight",
        ),
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
        (
            "blk.1.ffn_down.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
    ];
    for (g, h) in cases {
        assert_eq!(Family::Llama.checkpoint_name(g).as_deref(), Some(h), "{g}");
    }
    for bad in [
        "rope_freqs.weight",
        "blk.x.attn_q.weight",
        "blk..attn_q.weight",
        "blk.1.attn_qkv.weight",
    ] {
        assert_eq!(Family::Llama.checkpoint_name(bad), None, "{bad}");
    }
}

fn tiny_llama(with_output: bool) -> (GgufWriter, Vec<f32>, Vec<f32>) {
    // width 4, 1 head of 4 for Q, 1 KV head; K is [4, 4] too.
    let q_hf: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let k_hf: Vec<f32> = (0..16).map(|i| 100.0 + i as f32).collect();
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GgufValue::String("llama".into()))
        .kv("llama.block_count", GgufValue::U32(1))
        .kv("llama.context_length", GgufValue::U32(64))
        .kv("llama.embedding_length", GgufValue::U32(4))
        .kv("llama.feed_forward_length", GgufValue::U32(8))
        .kv("llama.attention.head_count", GgufValue::U32(1))
        .kv("llama.attention.head_count_kv", GgufValue::U32(1))
        .kv("llama.rope.freq_base", GgufValue::F32(100000.0))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        )
        .kv("tokenizer.ggml.tokens", str_array(&["a", "b", "c"]));
    w.f32_tensor("token_embd.weight", &[4, 3], &[0.5; 12]);
    w.f32_tensor(
        "blk.0.attn_q.weight",
        &[4, 4],
        &permute_like_converter(&q_hf, 4, 4, 1),
    );
    w.f32_tensor(
        "blk.0.attn_k.weight",
        &[4, 4],
        &permute_like_converter(&k_hf, 4, 4, 1),
    );
    let f16_bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    w.tensor("output_norm.weight", &[4], GgmlType::F16, f16_bytes);
    if with_output {
        w.f32_tensor("output.weight", &[4, 3], &[0.25; 12]);
    }
    (w, q_hf, k_hf)
}

/// Dropping the metadata's arrays before the weights are read (what a session's load
/// does) keeps the hyper-parameters, the vocabulary size among them, and the weights.
#[test]
fn weights_load_the_same_after_the_metadata_arrays_are_dropped() {
    let (w, _, _) = tiny_llama(true);
    let mut file = GgufFile::from_bytes(w.build()).unwrap();
    let (hp, weights) = (
        hyper_params(&file).unwrap(),
        load_gguf_weights(&file).unwrap(),
    );
    file.drop_metadata_arrays();
    assert!(
        file.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .is_empty()
    );
    assert_eq!(file.array_len("tokenizer.ggml.tokens").unwrap(), 3);
    assert_eq!(hyper_params(&file).unwrap(), hp);
    assert_eq!(load_gguf_weights(&file).unwrap(), weights);
}

#[test]
fn gguf_loader_renames_and_unpermutes() {
    let (w, q_hf, k_hf) = tiny_llama(true);
    let file = GgufFile::from_bytes(w.build()).unwrap();
    let hp = hyper_params(&file).unwrap();
    assert_eq!(
        hp,
        HyperParams {
            arch: Family::Llama,
            vocab_size: 3,
            hidden_size: 4,
            num_layers: 1,
            intermediate_size: 8,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 4,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            context_length: 64,
            tie_word_embeddings: false,
            sliding_window: None,
        }
    );
    let m = load_gguf_weights(&file).unwrap();
    let keys: Vec<_> = m.keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight",
        ]
    );
    assert_eq!(m["model.embed_tokens.weight"].shape, vec![3, 4]);
    assert_eq!(m["model.layers.0.self_attn.q_proj.weight"].data, q_hf);
    assert_eq!(m["model.layers.0.self_attn.k_proj.weight"].data, k_hf);
    assert_eq!(m["model.norm.weight"].data, vec![1.0, 2.0, 3.0, 4.0]);
}

/// An infinite weight in a tensor converted to f32, and a NaN block scale in a
/// quantized one, are typed errors naming the tensor.
#[test]
fn non_finite_weights_and_scales_are_errors() {
    use kvc_compiler::ir::{DType, ParamDecl, Type};
    let (mut w, _, _) = tiny_llama(false);
    w.tensors.retain(|t| t.0 != "output_norm.weight");
    let inf: Vec<u8> = [1.0f32, f32::INFINITY, 3.0, 4.0]
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    w.tensor("output_norm.weight", &[4], GgmlType::F16, inf);
    let file = GgufFile::from_bytes(w.build()).unwrap();
    let decl = ParamDecl {
        name: "model.norm.weight".into(),
        ty: Type::new(DType::F32, [4]),
    };
    assert!(matches!(
        load_gguf_params(&file, &[decl]),
        Err(WeightsError::NotFinite { name, what, .. })
            if name == "output_norm.weight" && what == "element 1"
    ));
    let mut blocks = vec![0u8; 2 * 34];
    blocks[34..36].copy_from_slice(&f16::NAN.to_le_bytes());
    assert!(matches!(
        check_block_scales("q", GgmlType::Q8_0, &blocks),
        Err(WeightsError::NotFinite { what, .. }) if what == "block 1's scale at byte 0"
    ));
    blocks[34..36].copy_from_slice(&f16::ONE.to_le_bytes());
    assert!(check_block_scales("q", GgmlType::Q8_0, &blocks).is_ok());
}

#[test]
fn gguf_loader_rejects_unknown_tensor_and_arch() {
    let (mut w, _, _) = tiny_llama(false);
    w.f32_tensor("rope_freqs.weight", &[2], &[1.0, 1.0]);
    let file = GgufFile::from_bytes(w.build()).unwrap();
    assert!(hyper_params(&file).unwrap().tie_word_embeddings);
    assert!(matches!(
        load_gguf_weights(&file),
        Err(WeightsError::UnmappedTensor(n)) if n == "rope_freqs.weight"
    ));
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GgufValue::String("phi3".into()));
    let file = GgufFile::from_bytes(w.build()).unwrap();
    assert!(matches!(
        load_gguf_weights(&file),
        Err(WeightsError::UnsupportedArchitecture(a)) if a == "phi3"
    ));
}

/// Values below come from the `gguf` Python package's `GGUFReader` and
/// `gguf.quants.dequantize` on the same file, with numpy's
/// `reshape(n_head, rows/n_head/2, 2, in).swapaxes(1, 2)` for Q and K.
#[test]
#[allow(clippy::excessive_precision)] // values as the Python gguf package prints them
fn smollm2_matches_python_gguf_reference() {
    let path = crate::load::fetch::default_smollm2_path().unwrap();
    let file = GgufFile::open(path).unwrap();
    let hp = hyper_params(&file).unwrap();
    assert_eq!(
        hp,
        HyperParams {
            arch: Family::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            num_layers: 30,
            intermediate_size: 1536,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            context_length: 8192,
            tie_word_embeddings: true,
            sliding_window: None,
        }
    );

    // Values printed by the Python gguf package, kept digit for digit.
    #[rustfmt::skip]
    #[allow(clippy::type_complexity)]
    let raw: [(&str, GgmlType, [usize; 2], [f32; 8], [f32; 8], f64, f64); 4] = [
        ("blk.0.attn_q.weight", GgmlType::Q4_1, [576, 576],
         [-0.0963134765625, 0.1573486328125, -0.0963134765625, -0.73046875, 1.1719970703125, -0.0963134765625, 0.030517578125, 0.6646728515625],
         [-0.0438232421875, 0.009185791015625, 0.009185791015625, 0.539276123046875, 0.009185791015625, -0.096832275390625, -0.14984130859375, -0.255859375],
         59.22322082519531, 26749.573275085306),
        ("token_embd.weight", GgmlType::Q8_0, [49152, 576],
         [-0.10654449462890625, 0.032978057861328125, 0.048198699951171875, -0.022830963134765625, -0.06849288940429688, -0.04566192626953125, 0.020294189453125, -0.12176513671875],
         [0.027801513671875, 0.03475189208984375, 0.18592262268066406, -0.10078048706054688, 0.07819175720214844, 0.12858200073242188, -0.11989402770996094, -0.0417022705078125],
         -15353.04449415207, 520415.71544763993),
        ("blk.29.ffn_down.weight", GgmlType::Q4_1, [576, 1536],
         [-0.2733154296875, 0.186279296875, 0.186279296875, 0.04840087890625, 0.186279296875, 0.186279296875, -0.31927490234375, -0.181396484375],
         [-0.08984375, -0.138671875, -0.08984375, 0.0078125, 0.056640625, 0.203125, -0.08984375, 0.056640625],
         49.83570861816406, 29667.074891592143),
        ("blk.0.attn_k.weight", GgmlType::Q4_1, [192, 576],
         [-0.1552734375, 0.3402099609375, -0.485595703125, -0.3204345703125, 0.0098876953125, 0.175048828125, 0.175048828125, 0.50537109375],
         [-0.0751953125, -0.0751953125, -0.42626953125, 0.27587890625, 0.0125732421875, -0.250732421875, 0.1881103515625, 0.3636474609375],
         26.937057495117188, 17499.561343912734),
    ];
    for (name, ty, shape, first, last, sum, sumsq) in raw {
        assert_eq!(file.tensor_info(name).unwrap().ty, ty, "{name}");
        let (got_shape, v) = file.tensor_f32(name).unwrap();
        assert_eq!(got_shape, shape, "{name}");
        assert_eq!(v[..8], first, "{name} first values");
        assert_eq!(v[v.len() - 8..], last, "{name} last values");
        let s: f64 = v.iter().map(|&x| f64::from(x)).sum();
        let s2: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!((s - sum).abs() < 1e-6 * sumsq, "{name} sum {s} vs {sum}");
        assert!(
            (s2 - sumsq).abs() < 1e-9 * sumsq,
            "{name} sumsq {s2} vs {sumsq}"
        );
    }

    let w = load_gguf_weights(&file).unwrap();
    assert_eq!(w.len(), 2 + 9 * 30);
    assert!(!w.contains_key("lm_head.weight"));
    for layer in 0..30 {
        let p = |s: &str| format!("model.layers.{layer}.{s}");
        assert_eq!(w[&p("self_attn.q_proj.weight")].shape, [576, 576]);
        assert_eq!(w[&p("self_attn.k_proj.weight")].shape, [192, 576]);
        assert_eq!(w[&p("self_attn.v_proj.weight")].shape, [192, 576]);
        assert_eq!(w[&p("self_attn.o_proj.weight")].shape, [576, 576]);
        assert_eq!(w[&p("mlp.gate_proj.weight")].shape, [1536, 576]);
        assert_eq!(w[&p("mlp.up_proj.weight")].shape, [1536, 576]);
        assert_eq!(w[&p("mlp.down_proj.weight")].shape, [576, 1536]);
        assert_eq!(w[&p("input_layernorm.weight")].shape, [576]);
        assert_eq!(w[&p("post_attention_layernorm.weight")].shape, [576]);
    }
    assert_eq!(w["model.embed_tokens.weight"].shape, [49152, 576]);
    assert_eq!(w["model.norm.weight"].shape, [576]);
    let q = &w["model.layers.0.self_attn.q_proj.weight"].data;
    assert_eq!(
        q[32 * 576..32 * 576 + 4],
        [
            -0.1173095703125,
            -0.1173095703125,
            -0.19281005859375,
            0.26019287109375
        ]
    );
    assert_eq!(
        q[33 * 576..33 * 576 + 4],
        [
            -0.06280517578125,
            0.1446533203125,
            0.00634765625,
            -0.4085693359375
        ]
    );
    let k = &w["model.layers.0.self_attn.k_proj.weight"].data;
    assert_eq!(
        k[100 * 576..100 * 576 + 4],
        [
            0.2972412109375,
            -0.07501220703125,
            0.54541015625,
            0.54541015625
        ]
    );
    let norm = &w["model.layers.0.input_layernorm.weight"].data;
    assert_eq!(
        norm[..4],
        [
            0.01397705078125,
            0.0238037109375,
            -0.019775390625,
            -0.0302734375
        ]
    );
}

fn safetensors_bytes(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut offset = 0;
    for (i, (name, dtype, shape, data)) in entries.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
            offset + data.len()
        ));
        offset += data.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, _, _, data) in entries {
        out.extend_from_slice(data);
    }
    out
}

#[test]
fn safetensors_f32_f16_bf16() {
    let f32_data: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f16_data: Vec<u8> = [0.5f32, -1.0]
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    let bf16_data: Vec<u8> = [0x3f80u16, 0xc040]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    let bytes = safetensors_bytes(&[
        ("model.a", "F32", vec![2, 3], f32_data),
        ("model.b", "F16", vec![2], f16_data),
        ("model.c", "BF16", vec![1, 2], bf16_data),
    ]);
    let m = load_safetensors_bytes(&bytes).unwrap();
    assert_eq!(
        m["model.a"],
        HostTensor {
            shape: vec![2, 3],
            data: vec![1.5, -2.0, 3.25, 0.0, 7.0, 8.0],
            quant: None,
        }
    );
    assert_eq!(m["model.b"].data, vec![0.5, -1.0]);
    assert_eq!(m["model.c"].shape, vec![1, 2]);
    assert_eq!(m["model.c"].data, vec![1.0, -3.0]);

    let bad = safetensors_bytes(&[("x", "I32", vec![1], vec![0; 4])]);
    assert!(matches!(
        load_safetensors_bytes(&bad),
        Err(WeightsError::UnsupportedDtype { name, .. }) if name == "x"
    ));
    assert!(matches!(
        load_safetensors_bytes(&[1, 2, 3]),
        Err(WeightsError::Safetensors(_))
    ));
}

#[test]
fn load_weights_dispatches_on_format() {
    let dir = std::env::temp_dir().join(format!("kvc-weights-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (w, q_hf, _) = tiny_llama(true);
    let g = dir.join("m.bin");
    std::fs::write(&g, w.build()).unwrap();
    assert_eq!(
        load_weights(&g).unwrap()["model.layers.0.self_attn.q_proj.weight"].data,
        q_hf
    );
    let s = dir.join("m.safetensors");
    std::fs::write(
        &s,
        safetensors_bytes(&[("t", "F32", vec![1], 2.0f32.to_le_bytes().to_vec())]),
    )
    .unwrap();
    assert_eq!(load_weights(&s).unwrap()["t"].data, vec![2.0]);
    for (name, bytes) in [("m.txt", &b"hello"[..]), ("short", b"GG")] {
        let u = dir.join(name);
        std::fs::write(&u, bytes).unwrap();
        assert!(matches!(
            load_weights(&u),
            Err(WeightsError::UnknownFormat(_))
        ));
    }
    assert!(matches!(
        load_weights(dir.join("missing")),
        Err(WeightsError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
