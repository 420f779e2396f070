//! The GGUF reader's unit tests: files built in memory, hostile headers, every block type.

use super::test_writer::{GgufWriter, put_str, str_array};
use half::f16;

use super::*;

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn metadata_round_trip_all_value_types() {
    let nested = GgufValue::Array {
        elem_type: GgufValueType::Array,
        items: vec![
            GgufValue::Array {
                elem_type: GgufValueType::I16,
                items: vec![GgufValue::I16(-3), GgufValue::I16(7)],
            },
            GgufValue::Array {
                elem_type: GgufValueType::I16,
                items: vec![],
            },
        ],
    };
    let kv = vec![
        ("a.u8", GgufValue::U8(250)),
        ("a.i8", GgufValue::I8(-100)),
        ("a.u16", GgufValue::U16(65000)),
        ("a.i16", GgufValue::I16(-32000)),
        ("a.u32", GgufValue::U32(4_000_000_000)),
        ("a.i32", GgufValue::I32(-2_000_000_000)),
        ("a.f32", GgufValue::F32(1.5e-5)),
        ("a.bool", GgufValue::Bool(true)),
        ("a.str", GgufValue::String("héllo ✓".into())),
        ("a.u64", GgufValue::U64(u64::MAX - 1)),
        ("a.i64", GgufValue::I64(i64::MIN + 1)),
        ("a.f64", GgufValue::F64(-2.25e100)),
        ("a.strs", str_array(&["x", "", "yz"])),
        ("a.nested", nested),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &kv {
        w.kv(k, v.clone());
    }
    let f = GgufFile::from_bytes(w.build()).unwrap();
    assert_eq!(f.version(), 3);
    let got: Vec<_> = f
        .metadata()
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let want: Vec<_> = kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    assert_eq!(got, want);
    assert_eq!(f.get_u32("a.u16").unwrap(), 65000);
    assert_eq!(f.get_u32("a.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u64("a.u64").unwrap(), u64::MAX - 1);
    assert_eq!(f.get_f32("a.f32").unwrap(), 1.5e-5);
    assert_eq!(f.get_str("a.str").unwrap(), "héllo ✓");
    assert!(f.get_bool("a.bool").unwrap());
    assert_eq!(f.get_str_array("a.strs").unwrap(), vec!["x", "", "yz"]);
    assert!(matches!(
        f.get_u32("a.i32"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        f.get_str("a.u8"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(f.get_u32("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
}

#[test]
fn version_2_is_accepted_and_1_rejected() {
    let mut w = GgufWriter::new();
    w.version = 2;
    w.kv("k", GgufValue::U32(1));
    assert_eq!(GgufFile::from_bytes(w.build()).unwrap().version(), 2);
    w.version = 1;
    assert!(matches!(
        GgufFile::from_bytes(w.build()),
        Err(GgufError::UnsupportedVersion(1))
    ));
}

#[test]
fn f32_tensor_round_trip_with_shape_reversed() {
    let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
    let mut w = GgufWriter::new();
    w.f32_tensor("first", &[3], &[1.0, 2.0, 3.0]);
    // dims fastest-first [4, 3] -> row-major shape [3, 4]
    w.f32_tensor("m", &[4, 3], &values);
    let f = GgufFile::from_bytes(w.build()).unwrap();
    assert_eq!(f.tensors().len(), 2);
    let info = f.tensor_info("m").unwrap();
    assert_eq!(info.dims, vec![4, 3]);
    assert_eq!(info.offset, 32);
    assert_eq!(info.n_bytes, 48);
    assert_eq!(f.data_offset() % 32, 0);
    let (shape, data) = f.tensor_f32("m").unwrap();
    assert_eq!(shape, vec![3, 4]);
    assert_eq!(data, values);
    assert_eq!(f.tensor_f32("first").unwrap().1, vec![1.0, 2.0, 3.0]);
    assert!(matches!(
        f.tensor_f32("x"),
        Err(GgufError::MissingTensor(_))
    ));
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.alignment = 64;
    w.kv("general.alignment", GgufValue::U32(64));
    w.f32_tensor("a", &[1], &[7.0]);
    w.f32_tensor("b", &[2], &[8.0, 9.0]);
    let f = GgufFile::from_bytes(w.build()).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(f.tensor_f32("b").unwrap().1, vec![8.0, 9.0]);

    let mut bad = GgufWriter::new();
    bad.kv("general.alignment", GgufValue::U32(48));
    assert!(matches!(
        GgufFile::from_bytes(bad.build()),
        Err(GgufError::BadAlignment(48))
    ));
}

#[test]
fn f16_and_bf16_decode() {
    let f16_vals = [1.0f32, -2.5, 0.099975586, 65504.0];
    let f16_bytes: Vec<u8> = f16_vals.iter().flat_map(|&v| f16b(v)).collect();
    // bf16 bit patterns: 0x3f80 = 1.0, 0xc040 = -3.0, 0x4049 = 3.140625
    let bf16_bytes: Vec<u8> = [0x3f80u16, 0xc040, 0x4049]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    let mut w = GgufWriter::new();
    w.tensor("h", &[4], GgmlType::F16, f16_bytes);
    w.tensor("b", &[3], GgmlType::BF16, bf16_bytes);
    let f = GgufFile::from_bytes(w.build()).unwrap();
    assert_eq!(f.tensor_f32("h").unwrap().1, f16_vals.to_vec());
    assert_eq!(f.tensor_f32("b").unwrap().1, vec![1.0, -3.0, 3.140625]);
}

#[test]
fn q8_0_decodes_scale_times_signed_bytes() {
    let mut block = Vec::new();
    block.extend_from_slice(&f16b(0.5));
    block.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let mut block2 = Vec::new();
    block2.extend_from_slice(&f16b(-2.0));
    block2.extend([127u8, 0x80].iter().chain([0u8; 30].iter()));
    let mut w = GgufWriter::new();
    w.tensor("q", &[32, 2], GgmlType::Q8_0, [block, block2].concat());
    let f = GgufFile::from_bytes(w.build()).unwrap();
    let (shape, v) = f.tensor_f32("q").unwrap();
    assert_eq!(shape, vec![2, 32]);
    assert_eq!(v[0], -8.0);
    assert_eq!(v[16], 0.0);
    assert_eq!(v[31], 7.5);
    assert_eq!(v[32], -254.0);
    assert_eq!(v[33], 256.0);
    assert!(v[34..].iter().all(|&x| x == 0.0));
}

#[test]
fn q4_0_low_nibbles_first_then_high() {
    let mut block = Vec::new();
    block.extend_from_slice(&f16b(0.25));
    // byte j: low nibble j, high nibble 15 - j
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut w = GgufWriter::new();
    w.tensor("q", &[32], GgmlType::Q4_0, block);
    let f = GgufFile::from_bytes(w.build()).unwrap();
    let v = f.tensor_f32("q").unwrap().1;
    for j in 0..16 {
        assert_eq!(v[j], (j as f32 - 8.0) * 0.25, "element {j}");
        assert_eq!(
            v[j + 16],
            ((15 - j) as f32 - 8.0) * 0.25,
            "element {}",
            j + 16
        );
    }
}

#[test]
fn q4_1_is_scale_times_nibble_plus_min() {
    let mut block = Vec::new();
    block.extend_from_slice(&f16b(0.5));
    block.extend_from_slice(&f16b(-3.0));
    block.extend((0..16u8).map(|j| (j % 16) | (((j * 3) % 16) << 4)));
    let mut w = GgufWriter::new();
    w.tensor("q", &[32], GgmlType::Q4_1, block);
    let f = GgufFile::from_bytes(w.build()).unwrap();
    let v = f.tensor_f32("q").unwrap().1;
    for j in 0..16usize {
        assert_eq!(v[j], j as f32 * 0.5 - 3.0);
        assert_eq!(v[j + 16], ((j * 3) % 16) as f32 * 0.5 - 3.0);
    }
}

#[test]
fn known_but_undecodable_type_is_reported() {
    let mut w = GgufWriter::new();
    w.tensor("k", &[256], GgmlType::Q2_K, vec![0; 84]);
    let f = GgufFile::from_bytes(w.build()).unwrap();
    assert_eq!(f.tensor_bytes("k").unwrap().len(), 84);
    assert!(matches!(
        f.tensor_f32("k"),
        Err(GgufError::UnsupportedTensorType {
            ty: GgmlType::Q2_K,
            ..
        })
    ));
}

#[test]
fn truncated_header_is_typed_error() {
    let mut w = GgufWriter::new();
    w.kv("k", GgufValue::U32(1));
    let full = w.build();
    for cut in [0usize, 3] {
        assert!(matches!(
            GgufFile::from_bytes(full[..cut].to_vec()),
            Err(GgufError::BadMagic { .. })
        ));
    }
    // 24-byte header, then key (8 + 1), type (4), value (4) end at byte 41.
    for cut in [4usize, 7, 8, 15, 23, 40] {
        let err = GgufFile::from_bytes(full[..cut].to_vec()).unwrap_err();
        assert!(
            matches!(err, GgufError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
    assert!(matches!(
        GgufFile::from_bytes(b"GGUS\x03\0\0\0".to_vec()),
        Err(GgufError::BadMagic { .. })
    ));
}

fn header(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&tensors.to_le_bytes());
    out.extend_from_slice(&kvs.to_le_bytes());
    out
}

#[test]
fn string_length_beyond_file_is_rejected() {
    let mut bytes = header(0, 1);
    bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
    bytes.extend_from_slice(b"abcdefgh");
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::StringTooLong { len, available: 8, .. }) if len == 1 << 62
    ));
}

#[test]
fn huge_counts_are_rejected_before_allocation() {
    let bytes = header(1 << 60, 0);
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::CountTooLarge { what: "tensor count", count, .. }) if count == 1 << 60
    ));
    let bytes = header(0, u64::MAX);
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::CountTooLarge {
            what: "metadata count",
            ..
        })
    ));
    let mut bytes = header(0, 1);
    put_str(&mut bytes, "arr");
    bytes.extend_from_slice(&9u32.to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    bytes.extend_from_slice(&[0; 64]);
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::CountTooLarge {
            what: "array length",
            ..
        })
    ));
}

#[test]
fn deep_array_nesting_is_rejected() {
    let mut bytes = header(0, 1);
    put_str(&mut bytes, "deep");
    bytes.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..40 {
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
    }
    bytes.extend_from_slice(&[0; 600]);
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::NestingTooDeep { .. })
    ));
}

#[test]
fn tensor_data_past_end_is_rejected() {
    let mut w = GgufWriter::new();
    w.f32_tensor("t", &[4], &[1.0, 2.0, 3.0, 4.0]);
    let mut bytes = w.build();
    bytes.truncate(bytes.len() - 1);
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::TensorDataOutOfBounds {
            size: 16,
            data_len: 15,
            ..
        })
    ));

    // A declared shape far larger than the file.
    let mut w = GgufWriter::new();
    w.tensor("big", &[1 << 20, 1 << 20], GgmlType::F32, vec![0; 16]);
    assert!(matches!(
        GgufFile::from_bytes(w.build()),
        Err(GgufError::TensorDataOutOfBounds { .. })
    ));

    // A dims product that overflows u64.
    let mut w = GgufWriter::new();
    w.tensor("ovf", &[1 << 40, 1 << 40], GgmlType::F32, vec![0; 16]);
    assert!(matches!(
        GgufFile::from_bytes(w.build()),
        Err(GgufError::ShapeOverflow { .. })
    ));
}

#[test]
fn unknown_tensor_type_is_rejected() {
    let mut w = GgufWriter::new();
    w.f32_tensor("t", &[1], &[1.0]);
    let mut bytes = w.build();
    // Patch the type id (after magic, version, counts, name, n_dims, dim).
    let type_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8;
    assert_eq!(bytes[type_pos..type_pos + 4], 0u32.to_le_bytes());
    bytes[type_pos..type_pos + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::UnknownTensorType { type_id: 99, ref name }) if name == "t"
    ));
}

#[test]
fn other_structural_errors() {
    let mut w = GgufWriter::new();
    w.tensor("q", &[33], GgmlType::Q8_0, vec![0; 68]);
    assert!(matches!(
        GgufFile::from_bytes(w.build()),
        Err(GgufError::NotBlockAligned {
            elements: 33,
            block: 32,
            ..
        })
    ));

    let mut w = GgufWriter::new();
    w.kv("k", GgufValue::U8(1)).kv("k", GgufValue::U8(2));
    assert!(matches!(
        GgufFile::from_bytes(w.build()),
        Err(GgufError::DuplicateKey(k)) if k == "k"
    ));

    let mut w = GgufWriter::new();
    w.f32_tensor("t", &[1], &[1.0])
        .f32_tensor("t", &[1], &[2.0]);
    assert!(matches!(
        GgufFile::from_bytes(w.build()),
        Err(GgufError::DuplicateTensor(_))
    ));

    // Tensor u's offset moved onto t's bytes.
    let mut w = GgufWriter::new();
    w.f32_tensor("t", &[8], &[1.0; 8])
        .f32_tensor("u", &[8], &[2.0; 8]);
    let mut bytes = w.build();
    let name_at = bytes
        .windows(9)
        .position(|b| b == b"\x01\0\0\0\0\0\0\0u")
        .unwrap();
    let offset_at = name_at + 9 + 4 + 8 + 4;
    bytes[offset_at..offset_at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::OverlappingTensors { first, second }) if first == "t" && second == "u"
            || first == "u" && second == "t"
    ));

    let mut w = GgufWriter::new();
    w.f32_tensor("t", &[1, 1, 1, 1, 1], &[1.0]);
    assert!(matches!(
        GgufFile::from_bytes(w.build()),
        Err(GgufError::TooManyDims { n_dims: 5, .. })
    ));

    let mut bytes = header(0, 1);
    put_str(&mut bytes, "k");
    bytes.extend_from_slice(&77u32.to_le_bytes());
    bytes.extend_from_slice(&[0; 8]);
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::UnknownValueType { type_id: 77, .. })
    ));

    let mut bytes = header(0, 1);
    bytes.extend_from_slice(&2u64.to_le_bytes());
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(&[0; 8]);
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::InvalidUtf8 { offset: 32 })
    ));
}

#[test]
fn misaligned_tensor_offset_is_rejected() {
    let mut w = GgufWriter::new();
    w.f32_tensor("a", &[1], &[1.0]);
    let mut bytes = w.build();
    let off_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8 + 4;
    bytes[off_pos..off_pos + 8].copy_from_slice(&4u64.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::MisalignedTensor {
            offset: 4,
            alignment: 32,
            ..
        })
    ));
}

#[test]
fn ggml_type_table_is_consistent() {
    for id in 0..40 {
        if let Some(t) = GgmlType::from_id(id) {
            assert_eq!(t.id(), id);
            assert!(t.block_bytes() > 0 && t.block_size() > 0);
            if let Some(b) = t.block_format() {
                assert_eq!(b.format().name, t.to_string());
            }
        }
    }
    // Every format the runtime keeps as blocks is a type this reader knows.
    for b in kvc_compiler::blocks::Block::ALL {
        let t = GgmlType::from_id(b.format().ggml_type).expect("known id");
        assert_eq!(t.block_format(), Some(b));
    }
    // Sizes cross-checked against the ggml block structs.
    assert_eq!(GgmlType::Q8_0.block_bytes(), 2 + 32);
    assert_eq!(GgmlType::Q4_0.block_bytes(), 2 + 16);
    assert_eq!(GgmlType::Q4_1.block_bytes(), 2 + 2 + 16);
    assert_eq!(GgmlType::Q5_0.block_bytes(), 2 + 4 + 16);
    assert_eq!(GgmlType::Q5_1.block_bytes(), 2 + 2 + 4 + 16);
    assert_eq!(GgmlType::Q4_K.block_bytes(), 2 + 2 + 12 + 128);
    assert_eq!(GgmlType::Q5_K.block_bytes(), 2 + 2 + 12 + 32 + 128);
    assert_eq!(GgmlType::Q6_K.block_bytes(), 128 + 64 + 16 + 2);
    assert_eq!(GgmlType::Q8_K.block_bytes(), 4 + 256 + 2 * 16);
}

/// Decodes `blocks` as a one-tensor file, through [`GgufFile::tensor_f32`].
fn decode_tensor(ty: GgmlType, blocks: Vec<u8>) -> Vec<f32> {
    let n = blocks.len() as u64 / ty.block_bytes() * ty.block_size();
    let mut w = GgufWriter::new();
    w.tensor("t", &[n], ty, blocks);
    GgufFile::from_bytes(w.build())
        .unwrap()
        .tensor_f32("t")
        .unwrap()
        .1
}

/// 32 5-bit values packed as in Q5_0/Q5_1: `qh` (bit `i` = bit 4 of value
/// `i`), then 16 bytes of nibbles (value `j` low, value `j + 16` high).
fn pack_5bit(q: &[u8; 32]) -> Vec<u8> {
    let qh = (0..32).fold(0u32, |acc, i| acc | (u32::from(q[i] >> 4) << i));
    let mut out = qh.to_le_bytes().to_vec();
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
    out
}

/// Every 5-bit value once, in a scrambled order.
fn five_bit_pattern() -> [u8; 32] {
    std::array::from_fn(|i| ((i * 13 + 7) % 32) as u8)
}

#[test]
fn q5_0_is_scale_times_five_bit_value_minus_16() {
    let q = five_bit_pattern();
    let q2: [u8; 32] = std::array::from_fn(|i| 31 - q[i]);
    let mut blocks = f16b(0.5).to_vec();
    blocks.extend(pack_5bit(&q));
    blocks.extend(f16b(-0.125));
    blocks.extend(pack_5bit(&q2));
    let v = decode_tensor(GgmlType::Q5_0, blocks);
    for i in 0..32 {
        assert_eq!(v[i], (f32::from(q[i]) - 16.0) * 0.5, "element {i}");
        assert_eq!(v[32 + i], (f32::from(q2[i]) - 16.0) * -0.125);
    }
    assert!(v.contains(&-8.0) && v.contains(&7.5));
}

#[test]
fn q5_1_is_scale_times_five_bit_value_plus_min() {
    let q = five_bit_pattern();
    let mut blocks = f16b(0.25).to_vec();
    blocks.extend(f16b(-3.0));
    blocks.extend(pack_5bit(&q));
    let v = decode_tensor(GgmlType::Q5_1, blocks);
    for i in 0..32 {
        assert_eq!(v[i], f32::from(q[i]) * 0.25 - 3.0, "element {i}");
    }
}

/// Eight 6-bit scales and minimums packed into 12 bytes as ggml's
/// quantizers write them.
fn pack_k_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    out
}

// Scales and minimums exercising every bit of the packed 6-bit fields.
const K_SC: [u8; 8] = [1, 17, 33, 63, 5, 21, 40, 62];
const K_M: [u8; 8] = [0, 2, 47, 63, 9, 16, 32, 60];

/// A value per element of a 256-element block, below `limit`.
fn k_values(limit: usize) -> [u8; 256] {
    std::array::from_fn(|e| ((e * 37 + e / 7) % limit) as u8)
}

#[test]
fn q4_k_is_sub_block_scale_times_nibble_minus_sub_block_min() {
    let q = k_values(16);
    let (d, dmin) = (0.5f32, 0.0625f32);
    let mut block = [f16b(d), f16b(dmin)].concat();
    block.extend(pack_k_scales(K_SC, K_M));
    // Each 32 bytes: sub-block 2p in the low nibbles, 2p + 1 in the high.
    for p in 0..4 {
        block.extend((0..32).map(|l| q[64 * p + l] | (q[64 * p + 32 + l] << 4)));
    }
    let v = decode_tensor(GgmlType::Q4_K, block);
    for e in 0..256 {
        let s = e / 32;
        let want = d * f32::from(K_SC[s]) * f32::from(q[e]) - dmin * f32::from(K_M[s]);
        assert_eq!(v[e], want, "element {e}");
    }
}

#[test]
fn q5_k_adds_the_high_bit_from_qh() {
    let q = k_values(32);
    let (d, dmin) = (-0.25f32, 1.5f32);
    let mut block = [f16b(d), f16b(dmin)].concat();
    block.extend(pack_k_scales(K_SC, K_M));
    // Bit s of qh[l]: bit 4 of element l of sub-block s.
    block.extend((0..32).map(|l| (0..8).fold(0u8, |acc, s| acc | ((q[32 * s + l] >> 4) << s))));
    for p in 0..4 {
        block.extend((0..32).map(|l| (q[64 * p + l] & 0x0f) | ((q[64 * p + 32 + l] & 0x0f) << 4)));
    }
    let v = decode_tensor(GgmlType::Q5_K, block);
    for e in 0..256 {
        let s = e / 32;
        let want = d * f32::from(K_SC[s]) * f32::from(q[e]) - dmin * f32::from(K_M[s]);
        assert_eq!(v[e], want, "element {e}");
    }
}

#[test]
fn q6_k_is_group_scale_times_six_bit_value_minus_32() {
    let q = k_values(64);
    let scales: [i8; 16] = [
        1, -1, 127, -128, 3, 64, -7, 0, 12, -33, 100, 5, -64, 2, 90, -100,
    ];
    let d = 0.0078125f32;
    // As ggml's Q6_K quantizer: per 128 values, 64 bytes of nibbles and 32 of high bits.
    let (mut ql, mut qh) = (Vec::new(), Vec::new());
    for h in 0..2 {
        let q = &q[128 * h..];
        ql.extend((0..32).map(|l| (q[l] & 0x0f) | ((q[l + 64] & 0x0f) << 4)));
        ql.extend((0..32).map(|l| (q[l + 32] & 0x0f) | ((q[l + 96] & 0x0f) << 4)));
        qh.extend((0..32).map(|l| {
            (q[l] >> 4)
                | ((q[l + 32] >> 4) << 2)
                | ((q[l + 64] >> 4) << 4)
                | ((q[l + 96] >> 4) << 6)
        }));
    }
    let mut block = [ql, qh].concat();
    block.extend(scales.iter().map(|&s| s as u8));
    block.extend(f16b(d));
    let v = decode_tensor(GgmlType::Q6_K, block);
    for e in 0..256 {
        let want = d * f32::from(scales[e / 16]) * (f32::from(q[e]) - 32.0);
        assert_eq!(v[e], want, "element {e}");
    }
}

#[test]
fn q8_k_is_f32_scale_times_signed_bytes() {
    let d = -0.375f32;
    let mut block = d.to_le_bytes().to_vec();
    block.extend((0..=255u8).map(|b| b.wrapping_add(128)));
    block.extend([0u8; 32]);
    let v = decode_tensor(GgmlType::Q8_K, block);
    for (i, &x) in v.iter().enumerate() {
        assert_eq!(x, d * (i as f32 - 128.0), "element {i}");
    }
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Pseudo-random blocks of every quantized type, dequantized by the `gguf`
/// Python package (see the fixture's generator and provenance line).
/// Compared bit for bit: each value is a few f32 products and at most one
/// sum, done in the same order as numpy does them, and every product of
/// an f16 scale with an integer sub-block scale is exact, so there is no rounding
/// difference to allow for.
#[test]
fn quant_blocks_match_the_gguf_python_package() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../../tests/fixtures/quant_blocks.json")).unwrap();
    let types = fixture["types"].as_object().unwrap();
    assert_eq!(types.len(), 9);
    for (name, case) in types {
        let ty = GgmlType::from_id(case["type_id"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(&ty.to_string(), name);
        let blocks = from_hex(case["blocks_hex"].as_str().unwrap());
        let want: Vec<u32> = from_hex(case["values_f32_le_hex"].as_str().unwrap())
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got: Vec<u32> = dequantize(ty, &blocks)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{name} element {i}: got {}, want {}",
                f32::from_bits(*g),
                f32::from_bits(*w)
            );
        }
    }
}

#[test]
fn partial_blocks_are_an_error() {
    for id in 0..40 {
        let Some(ty) = GgmlType::from_id(id) else {
            continue;
        };
        let block = ty.block_bytes() as usize;
        let whole = vec![0u8; 3 * block];
        if !ty.can_dequantize() {
            assert_eq!(
                dequantize(ty, &whole),
                Err(DequantizeError::Unsupported(ty))
            );
            continue;
        }
        assert_eq!(
            dequantize(ty, &whole).unwrap().len(),
            3 * ty.block_size() as usize
        );
        assert!(dequantize(ty, &[]).unwrap().is_empty());
        if block > 1 {
            for len in [1, block - 1, 2 * block + 1] {
                assert_eq!(
                    dequantize(ty, &whole[..len]),
                    Err(DequantizeError::PartialBlock {
                        ty,
                        len,
                        block_bytes: block as u64
                    }),
                    "{ty} with {len} bytes"
                );
            }
        }
    }
}

#[test]
fn many_blocks_decode_in_order() {
    // Enough Q8_0 blocks for several parallel tasks, each with its own scale.
    let n = 3000;
    let blocks: Vec<u8> = (0..n)
        .flat_map(|b| {
            // Integers up to 2048 are exact in f16.
            let mut block = f16b((b % 2048) as f32).to_vec();
            block.extend((0..32).map(|i| i as u8));
            block
        })
        .collect();
    let v = dequantize(GgmlType::Q8_0, &blocks).unwrap();
    assert_eq!(v.len(), 32 * n);
    for (i, &x) in v.iter().enumerate() {
        let scale = (i / 32 % 2048) as f32;
        assert_eq!(x, scale * (i % 32) as f32, "element {i}");
    }
}

#[test]
fn open_maps_a_file_from_disk() {
    let dir = std::env::temp_dir().join(format!("kvc-gguf-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = GgufWriter::new();
    w.kv("k", GgufValue::U32(7));
    w.f32_tensor("t", &[3], &[1.0, -2.0, 0.5]);
    let big: Vec<f32> = (0..8192).map(|i| i as f32).collect();
    w.f32_tensor("big", &[8192], &big);
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, w.build()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_u32("k").unwrap(), 7);
    // Released pages (whole pages of the 32 KiB tensor) read back from the file: a
    // shared view taken before and a read after see the same values.
    let shared = f.tensor_shared("big").unwrap();
    f.release_tensor("big");
    f.release(0..f.storage.bytes().len());
    assert_eq!(&shared[..], f.tensor_bytes("big").unwrap());
    assert_eq!(f.tensor_f32("big").unwrap().1, big);
    let clone = f.clone();
    drop(f);
    assert_eq!(clone.tensor_f32("t").unwrap().1, vec![1.0, -2.0, 0.5]);

    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::BadMagic { .. })
    ));
    assert!(matches!(
        GgufFile::open(dir.join("absent.gguf")),
        Err(GgufError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
