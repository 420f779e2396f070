//! Each pass on its own: `filetests/PASS/*.ir` hold a small graph in the text form, written
//! by hand; the test parses it, runs the pass named by its directory, and snapshots the
//! graph it prints (`snapshots/filetests__PASS.NAME.snap`). Every pass has at least two
//! files, and at least one whose graph the pass changes, so removing a pass from the
//! pipeline (or making it do nothing) fails here.
//!
//! And the parser against the printer: every graph that lowering makes, for every model
//! and KV policy, storage and sampler, reads back to the same text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kvc_compiler::ir::parse::parse_graph;
use kvc_compiler::passes::PIPELINE;
use kvc_compiler::spec::{KvPolicy, KvStorage, Sampler};
use kvc_compiler::{Overrides, compile_file};

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

#[test]
fn each_pass_rewrites_its_filetests() {
    let dir = here().join("filetests");
    let mut changed: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for pass in PIPELINE {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(pass.name))
            .unwrap_or_else(|e| panic!("filetests/{}: {e}", pass.name))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "ir"))
            .collect();
        files.sort();
        for path in files {
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let mut m = parse_graph(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let before = m.display().to_string();
            (pass.run)(&mut m.graph);
            let after = m.display().to_string();
            // What the pass wrote must itself be a well-typed graph.
            parse_graph(&after).unwrap_or_else(|e| panic!("{} after {}: {e}", name, pass.name));
            let entry = changed.entry(pass.name).or_default();
            entry.0 += 1;
            entry.1 += usize::from(after != before);
            insta::assert_snapshot!(format!("{}.{name}", pass.name), after);
        }
    }
    for pass in PIPELINE {
        let (files, differ) = changed.get(pass.name).copied().unwrap_or_default();
        assert!(files >= 2, "pass {} has {files} filetests", pass.name);
        assert!(
            differ >= 1,
            "no filetest of pass {} changes its graph",
            pass.name
        );
    }
}

#[test]
fn every_lowered_graph_reads_back_to_its_text() {
    let models: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> =
            std::fs::read_dir(here().parent().unwrap().parent().unwrap().join("models"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "ron"))
                .collect();
        v.sort();
        v
    };
    let policies = [
        None,
        Some(KvPolicy::H2o {
            budget: 16,
            recent: 4,
        }),
        Some(KvPolicy::parse("snapkv:16:4:3").unwrap()),
        Some(KvPolicy::Tova { budget: 16 }),
        Some(KvPolicy::parse("sink-window:4:12").unwrap()),
        Some(KvPolicy::parse("random:16:1").unwrap()),
    ];
    let mut graphs = 0;
    for path in &models {
        for kv in &policies {
            for storage in [None, Some(KvStorage::I8)] {
                let o = Overrides {
                    kv: *kv,
                    kv_storage: storage,
                    sampler: Some(Sampler::Sample),
                    batch: Some(2),
                    prefill_len: Some(8),
                    cache_len: Some(32),
                    ..Overrides::default()
                };
                let p =
                    compile_file(path, &o).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                for g in [&p.prefill, &p.decode] {
                    let text = p.display_graph(g).to_string();
                    let m = parse_graph(&text).unwrap_or_else(|e| {
                        panic!("{} {kv:?} {storage:?} {}: {e}", path.display(), g.name)
                    });
                    assert_eq!(m.display().to_string(), text);
                    assert_eq!(m.graph.nodes.len(), g.nodes.len());
                    graphs += 1;
                }
            }
        }
    }
    assert!(graphs >= 24, "{graphs} graphs");
}
