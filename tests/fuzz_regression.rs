//! Replays the fuzz targets' regression corpus (`fuzz/regression/TARGET/`: seeds and
//! every input a fuzzing run found to fail, once fixed) through the same entry points the
//! targets call (`kvc_compiler::fuzzing`, `kvc_runtime::load::fuzzing`,
//! `kvc_runtime::api::fuzz`): each must return.

use std::path::PathBuf;

use kvc_runtime::load::tokenizer::Tokenizer;

/// The files of one target's regression corpus, sorted (at least one).
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regression")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
}

fn smollm2_tokenizer() -> Tokenizer {
    let path = kvc_runtime::load::fetch::default_smollm2_path().expect("SmolLM2 weights");
    Tokenizer::from_gguf_path(path).unwrap()
}

#[test]
fn spec_corpus() {
    for (name, bytes) in corpus("spec") {
        eprintln!("{name}");
        kvc_compiler::fuzzing::spec(&bytes);
    }
}

#[test]
fn artifact_corpus() {
    for (name, bytes) in corpus("artifact") {
        eprintln!("{name}");
        kvc_compiler::fuzzing::artifact(&bytes);
    }
}

#[test]
fn gguf_corpus() {
    for (name, bytes) in corpus("gguf") {
        eprintln!("{name}");
        kvc_runtime::load::fuzzing::gguf(&bytes);
    }
}

#[test]
fn tokenizer_and_chat_template_corpus() {
    let mut tok = smollm2_tokenizer();
    for (name, bytes) in corpus("tokenizer") {
        eprintln!("{name}");
        kvc_runtime::load::fuzzing::tokenizer(&tok, &bytes);
    }
    for (name, bytes) in corpus("chat_template") {
        eprintln!("{name}");
        kvc_runtime::load::fuzzing::chat_template(&mut tok, &bytes);
    }
}

#[test]
fn request_corpus() {
    for (name, bytes) in corpus("request") {
        eprintln!("{name}");
        kvc_runtime::api::fuzz(&bytes);
    }
}
