//! The verifier catches broken programs and names the node at fault.

use std::path::Path;

use kvc_compiler::ir::{BinaryOp, CachePart, DType, Op, Program, StateRole, Type, ValueId};
use kvc_compiler::spec::KvPolicy;
use kvc_compiler::verify::verify;
use kvc_compiler::{ModelSpec, Overrides, compile, compile_file};

fn tiny() -> Program {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-llama.ron");
    compile(&ModelSpec::load(&path).unwrap()).unwrap()
}

fn first(p: &Program, name: &str) -> usize {
    p.decode
        .nodes
        .iter()
        .position(|n| n.op.name() == name)
        .unwrap()
}

#[test]
fn a_valid_program_verifies() {
    verify(&tiny(), "test").unwrap();
}

#[test]
fn wrong_recorded_shape_is_reported_at_its_node() {
    let mut p = tiny();
    let i = first(&p, "linear");
    p.decode.nodes[i].ty = Type::new(DType::F32, [3, 1, 63]);
    let err = verify(&p, "test").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("decode %{i}: linear is recorded as f32[3,1,63]")),
        "{msg}"
    );
    // The bad type also breaks the consumers of that node: every problem is collected.
    assert!(err.problems.len() >= 2, "{msg}");
    assert!(err.problems.iter().all(|p| p.graph == "decode"));
}

#[test]
fn mismatched_operand_shapes_are_reported() {
    let mut p = tiny();
    // The MLP's down projection [64, 128] reads 128 features; hand it to a linear whose x
    // has 64 (the next layer's query projection).
    let w = p
        .decode
        .nodes
        .iter()
        .position(|n| matches!(n.op, Op::Param(_)) && n.ty.shape == vec![64, 128])
        .unwrap();
    let i = w
        + p.decode.nodes[w..]
            .iter()
            .skip(3)
            .position(|n| n.op.name() == "linear")
            .unwrap()
        + 3;
    let Op::Linear { x, .. } = p.decode.nodes[i].op else {
        unreachable!()
    };
    p.decode.nodes[i].op = Op::Linear {
        x,
        w: ValueId(w as u32),
    };
    let msg = verify(&p, "after pass test").unwrap_err().to_string();
    assert!(msg.starts_with("invalid program after pass test"), "{msg}");
    assert!(
        msg.contains(&format!(
            "decode %{i}: linear: expected w [_, 64] to match x f32[3,1,64], found w f32[64,128]"
        )),
        "{msg}"
    );
}

#[test]
fn use_before_definition_is_reported() {
    let mut p = tiny();
    let last = p.decode.nodes.len() as u32 - 1;
    let i = first(&p, "not");
    p.decode.nodes[i].op = Op::Binary {
        op: BinaryOp::And,
        a: ValueId(last),
        b: ValueId(last),
    };
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(
        msg.contains(&format!(
            "decode %{i}: and: a %{last} is used before it is defined"
        )),
        "{msg}"
    );
}

#[test]
fn bad_state_update_is_reported() {
    let mut p = tiny();
    let pos = p.state_id("pos").unwrap();
    let u = p
        .decode
        .updates
        .iter_mut()
        .find(|u| u.state == pos)
        .unwrap();
    let logits = p.decode.outputs[0].value;
    u.value = logits;
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(
        msg.contains("state pos is i32[3] but is updated with f32[3,256]"),
        "{msg}"
    );
}

#[test]
fn a_second_read_of_a_state_variable_is_reported() {
    let mut p = tiny();
    let i = first(&p, "state");
    let dup = p.decode.nodes[i].clone();
    // Insert an identical read right after the first one; shift later references.
    p.decode.nodes.insert(i + 1, dup);
    for n in p.decode.nodes.iter_mut().skip(i + 2) {
        n.op.map_args(|a| {
            if a.0 as usize > i {
                ValueId(a.0 + 1)
            } else {
                a
            }
        });
    }
    for o in &mut p.decode.outputs {
        o.value.0 += 1;
    }
    for u in &mut p.decode.updates {
        u.value.0 += 1;
    }
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(
        msg.contains(&format!("decode %{}: state #", i + 1))
            && msg.contains("read by more than one node"),
        "{msg}"
    );
}

#[test]
fn the_runtime_interface_is_checked() {
    let mut p = tiny();
    p.decode.outputs.retain(|o| o.name != "done");
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(msg.contains("decode: expected outputs"), "{msg}");
}

fn role_of<'a>(p: &'a mut Program, name: &str) -> &'a mut StateRole {
    let id = p.state_id(name).unwrap();
    &mut p.state[id.0 as usize].role
}

#[test]
fn a_missing_or_repeated_control_role_is_reported() {
    let mut p = tiny();
    *role_of(&mut p, "limit") = StateRole::Pos;
    assert_eq!(p.interface(), None);
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(
        msg.contains("program: state role pos is held by 2 variables: pos, limit"),
        "{msg}"
    );
    assert!(
        msg.contains("program: missing state with role limit: i32[3]"),
        "{msg}"
    );
}

#[test]
fn a_control_role_of_the_wrong_type_is_reported() {
    let mut p = tiny();
    *role_of(&mut p, "token") = StateRole::Done;
    *role_of(&mut p, "done") = StateRole::Token;
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(
        msg.contains("program: state done (role token) must be i32[3], found bool[3]"),
        "{msg}"
    );
    assert!(
        msg.contains("program: state token (role done) must be bool[3], found i32[3]"),
        "{msg}"
    );
}

#[test]
fn sampling_roles_follow_the_sampler() {
    let mut p = tiny();
    *role_of(&mut p, "token") = StateRole::TopK;
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(
        msg.contains("program: state token has role top_k, which this program does not use"),
        "{msg}"
    );
    assert!(
        msg.contains("missing state with role token: i32[3]"),
        "{msg}"
    );
}

#[test]
fn cache_parts_are_checked_against_the_keys() {
    let o = Overrides {
        kv: Some(KvPolicy::H2o {
            budget: 16,
            recent: 4,
        }),
        cache_len: Some(64),
        ..Overrides::default()
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-llama.ron");
    let mut p = compile_file(&path, &o).unwrap();
    let scores = *role_of(&mut p, "score.1");
    *role_of(&mut p, "score.1") = *role_of(&mut p, "slot_pos.1");
    *role_of(&mut p, "slot_pos.1") = scores;
    *role_of(&mut p, "v.0") = StateRole::Cache {
        layer: 2,
        part: CachePart::Values,
    };
    let msg = verify(&p, "test").unwrap_err().to_string();
    for want in [
        "state slot_pos.1 (role cache(1,scores)) must be f32[3,2,24], found i32[3,2,24]",
        "state score.1 (role cache(1,slot_positions)) must be i32[3,2,24], found f32[3,2,24]",
        "state v.0 has role cache(2,values), but the model has 2 layers",
        "missing state with role cache(0,values): f32[3,2,24,16]",
    ] {
        assert!(msg.contains(&format!("program: {want}")), "{msg}");
    }
}

/// `is_in` reads i32 and holds at most `MAX_IS_IN_VALUES` constants; an f16 cache's
/// declared dtype is checked against its role; every value is bounded in size.
#[test]
fn is_in_f16_caches_and_value_sizes_are_checked() {
    use kvc_compiler::ir::MAX_IS_IN_VALUES;
    let base = tiny();

    let mut p = base.clone();
    let i = first(&p, "is_in");
    let Op::IsIn { values, .. } = &mut p.decode.nodes[i].op else {
        unreachable!()
    };
    *values = vec![0; MAX_IS_IN_VALUES + 1];
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(msg.contains(&format!("decode %{i}: is_in")), "{msg}");
    assert!(msg.contains("at most 256 values"), "{msg}");

    let mut p = base.clone();
    let i = first(&p, "is_in");
    let logits = first(&p, "linear");
    let Op::IsIn { x, .. } = &mut p.decode.nodes[i].op else {
        unreachable!()
    };
    *x = ValueId(logits as u32);
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(msg.contains("expected x of dtype i32"), "{msg}");

    // The f16 storage of a spec verifies; one layer's values declared f32 instead are
    // reported at the reads, the update and the cache role.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-llama.ron");
    let o = Overrides {
        kv_storage: Some(kvc_compiler::spec::KvStorage::F16),
        ..Overrides::default()
    };
    let mut p = compile_file(&path, &o).unwrap();
    verify(&p, "test").unwrap();
    let v = p.state.iter().position(|s| s.name == "v.0").unwrap();
    p.state[v].ty.dtype = DType::F32;
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(
        msg.contains("state v.0 (role cache(0,values)) must be f16"),
        "{msg}"
    );

    // A constant of 2^64 elements.
    let mut p = base;
    let c = p
        .decode
        .nodes
        .iter()
        .position(|n| matches!(n.op, Op::Const { .. }))
        .unwrap();
    let big = vec![u32::MAX, u32::MAX, u32::MAX];
    if let Op::Const { shape, .. } = &mut p.decode.nodes[c].op {
        *shape = big.clone();
    }
    p.decode.nodes[c].ty.shape = big;
    let msg = verify(&p, "test").unwrap_err().to_string();
    assert!(msg.contains(&format!("decode %{c}: ")), "{msg}");
    assert!(msg.contains("is over 1099511627776 B"), "{msg}");
}
