//! Output paths checked before the work that fills them: a benchmark or an evaluation can
//! run for hours, so a path that cannot be written is refused at the start, naming the
//! option. Only what the user named is created: a missing parent directory is an error,
//! not something to make.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Result, bail};

/// The directory a file at `path` goes in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The directory `path` (given as `flag`) would be made in, which must exist: kvc creates
/// only `what`, never a missing parent.
fn existing_parent<'a>(flag: &str, path: &'a Path, what: &str) -> Result<&'a Path> {
    let dir = parent(path);
    if !dir.is_dir() {
        bail!(
            "{flag} {}: the directory {} does not exist (kvc creates only {what})",
            path.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// Writes and removes a small file in `dir`: the test that files can be made there.
fn probe(flag: &str, shown: &Path, dir: &Path) -> Result<()> {
    let name = dir.join(format!(".kvc-probe-{}", std::process::id()));
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&name)
        .and_then(|mut f| f.write_all(b"kvc").and_then(|()| f.sync_all()));
    let _ = fs::remove_file(&name);
    if let Err(e) = made {
        bail!(
            "{flag} {}: cannot write in {}: {e}",
            shown.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Checks that the file `path` (given as `flag`) can be written: an existing regular file
/// that opens for writing, or a new name in an existing directory that takes files.
pub(crate) fn check_file(flag: &str, path: &Path) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if !m.is_file() => bail!(
            "{flag} {}: not a regular file but a {}; name a file to write",
            path.display(),
            kvc_compiler::files::kind(&m)
        ),
        Ok(_) => {
            // Opening to append changes nothing; the file is replaced whole at the end.
            if let Err(e) = OpenOptions::new().append(true).open(path) {
                bail!("{flag} {}: cannot write: {e}", path.display());
            }
            probe(flag, path, parent(path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            probe(flag, path, existing_parent(flag, path, "the file")?)
        }
        Err(e) => bail!("{flag} {}: {e}", path.display()),
    }
}

/// Checks that the directory `path` (given as `flag`) can hold new files, creating it
/// (and only it) when it does not exist.
pub(crate) fn check_dir(flag: &str, path: &Path) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if !m.is_dir() => bail!(
            "{flag} {}: not a directory but a {}",
            path.display(),
            kvc_compiler::files::kind(&m)
        ),
        Ok(_) => probe(flag, path, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            existing_parent(flag, path, &path.display().to_string())?;
            if let Err(e) = fs::create_dir(path) {
                bail!("{flag} {}: cannot create: {e}", path.display());
            }
            probe(flag, path, path)
        }
        Err(e) => bail!("{flag} {}: {e}", path.display()),
    }
}
