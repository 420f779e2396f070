//! Compiled artifacts on disk: a directory with `program.json` (the versioned, serialized
//! [`Program`]) beside the text of both graphs and the memory plan.
//!
//! Reading one trusts nothing in it: the header's format and version, the JSON, the
//! verifier (which bounds every value's size), and finally the program must equal what
//! its own embedded spec compiles to, given the parameter types it declares. A changed
//! node, constant, state or stop token therefore ends in [`ArtifactError::Tampered`]
//! before any allocation, and every other field of the program is then as trustworthy
//! as a fresh compile.

use std::path::{Path, PathBuf};

use crate::files::ReadError;
use crate::ir::{DType, FORMAT, FORMAT_VERSION, Graph, Program};
use crate::lower::WeightTypes;
use crate::memory::MemoryPlan;
use crate::verify::VerifyError;

/// File name of the serialized program inside an artifact directory.
pub const PROGRAM_FILE: &str = "program.json";

/// Largest `program.json` read (bytes): the real models' artifacts are a few MiB.
pub const MAX_PROGRAM_BYTES: u64 = 256 << 20;

/// Why an artifact could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `program.json` is larger than [`MAX_PROGRAM_BYTES`].
    #[error("{path}: {size} B is more than an artifact's {MAX_PROGRAM_BYTES} B")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// `program.json` is a directory, device, FIFO or socket.
    #[error("{path}: not a regular file but a {kind}")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Not JSON with `format` and `version` fields.
    #[error("not a kvc artifact ({0})")]
    NotAnArtifact(serde_json::Error),
    /// Another format or version.
    #[error(
        "artifact is {format} v{version}, this kvc reads {FORMAT} v{FORMAT_VERSION}; recompile it"
    )]
    Version {
        /// The `format` field.
        format: String,
        /// The `version` field.
        version: u32,
    },
    /// The JSON does not describe a program.
    #[error("{0}")]
    Parse(serde_json::Error),
    /// The program is not valid.
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    /// The embedded spec no longer compiles (it was edited).
    #[error("its embedded spec does not compile: {0}")]
    Spec(String),
    /// The program differs from what its embedded spec compiles to.
    #[error("it differs from what its embedded spec compiles to ({0}); recompile the spec")]
    Tampered(String),
}

/// Writes `program.json`, `prefill.txt`, `decode.txt` and `memory.txt` into `dir`.
pub fn write(p: &Program, dir: &Path) -> Result<(), ArtifactError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArtifactError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = serde_json::to_string(p).map_err(ArtifactError::Parse)?;
    let files = [
        (PROGRAM_FILE, json),
        ("prefill.txt", p.display_graph(&p.prefill).to_string()),
        ("decode.txt", p.display_graph(&p.decode).to_string()),
        ("memory.txt", format!("{}\n", MemoryPlan::of(p))),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(())
}

/// Reads and checks the artifact in `dir` (see the module docs).
pub fn read(dir: &Path) -> Result<Program, ArtifactError> {
    let path = dir.join(PROGRAM_FILE);
    let io = |source| ArtifactError::Io {
        path: path.clone(),
        source,
    };
    let text = match crate::files::read_bounded(&path, MAX_PROGRAM_BYTES) {
        Ok(t) => t,
        Err(ReadError::Io(e)) => return Err(io(e)),
        Err(ReadError::TooLarge { size, .. }) => {
            return Err(ArtifactError::TooLarge { path, size });
        }
        Err(ReadError::NotAFile { kind }) => return Err(ArtifactError::NotAFile { path, kind }),
    };
    parse(&text)
}

/// Checks the bytes of a `program.json` (see the module docs).
pub fn parse(bytes: &[u8]) -> Result<Program, ArtifactError> {
    #[derive(serde::Deserialize)]
    struct Header {
        format: String,
        version: u32,
    }
    let h: Header = serde_json::from_slice(bytes).map_err(ArtifactError::NotAnArtifact)?;
    if h.format != FORMAT || h.version != FORMAT_VERSION {
        return Err(ArtifactError::Version {
            format: h.format,
            version: h.version,
        });
    }
    let p: Program = serde_json::from_slice(bytes).map_err(ArtifactError::Parse)?;
    crate::verify::verify(&p, "after loading the artifact")?;
    // The parameter types the program declares stand for the weights file's types.
    let types: WeightTypes = p
        .params
        .iter()
        .filter(|d| d.ty.dtype != DType::F32)
        .map(|d| (d.name.clone(), d.ty.dtype))
        .collect();
    p.spec
        .validate()
        .map_err(|(field, msg)| ArtifactError::Spec(format!("{field}: {msg}")))?;
    let fresh =
        crate::compile_with(&p.spec, &types).map_err(|e| ArtifactError::Spec(e.to_string()))?;
    if fresh != p {
        return Err(ArtifactError::Tampered(first_difference(&p, &fresh)));
    }
    Ok(p)
}

/// Where `found` first differs from `expected`, in words.
fn first_difference(found: &Program, expected: &Program) -> String {
    if found.config != expected.config {
        return "the compiled config".into();
    }
    if found.params != expected.params {
        return "the parameter table".into();
    }
    if found.state != expected.state {
        return "the state table".into();
    }
    for (a, b) in found.graphs().into_iter().zip(expected.graphs()) {
        if let Some(d) = graph_difference(found, a, expected, b) {
            return d;
        }
    }
    "the header".into()
}

fn graph_difference(pa: &Program, a: &Graph, pb: &Program, b: &Graph) -> Option<String> {
    if a == b {
        return None;
    }
    let (ta, tb) = (
        pa.display_graph(a).to_string(),
        pb.display_graph(b).to_string(),
    );
    for (i, (la, lb)) in ta.lines().zip(tb.lines()).enumerate() {
        if la != lb {
            return Some(format!(
                "graph {} line {}: found `{}`, expected `{}`",
                a.name,
                i + 1,
                la.trim(),
                lb.trim()
            ));
        }
    }
    Some(format!("graph {}", a.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let mut specs: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "ron"))
            .collect();
        specs.sort();
        specs
    }

    /// Every model spec's program reads back equal, and a changed op, constant or stop
    /// token is refused with where it differs.
    #[test]
    fn artifacts_round_trip_and_edits_are_refused() {
        let dir = std::env::temp_dir().join(format!("kvc-artifact-{}", std::process::id()));
        for spec in models() {
            let p = crate::compile(&crate::spec::ModelSpec::load(&spec).unwrap()).unwrap();
            write(&p, &dir).unwrap();
            assert_eq!(read(&dir).unwrap(), p, "{}", spec.display());
        }
        let p = crate::compile(
            &crate::spec::ModelSpec::load(&models()[0].with_file_name("tiny-llama.ron")).unwrap(),
        )
        .unwrap();
        let json = serde_json::to_string(&p).unwrap();
        let tampered = json.replacen("\"Add\"", "\"Mul\"", 1);
        assert!(matches!(
            parse(tampered.as_bytes()),
            Err(ArtifactError::Tampered(at)) if at.contains("mul")
        ));
        let mut q = p.clone();
        q.spec.stop_tokens = vec![1];
        let edited = serde_json::to_vec(&q).unwrap();
        assert!(matches!(parse(&edited), Err(ArtifactError::Tampered(_))));
        assert!(matches!(
            parse(b"{\"format\": \"kvc-program\", \"version\": 1}"),
            Err(ArtifactError::Version { version: 1, .. })
        ));
        assert!(matches!(parse(b"[]"), Err(ArtifactError::NotAnArtifact(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
