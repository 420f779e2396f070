//! Reading files a user names, bounded: only regular files (after symlinks), and at most a
//! given number of bytes, so that a path to `/dev/zero`, a FIFO or an oversized file ends
//! in an error at once instead of an unbounded read or a wait for a writer.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

/// Why a bounded read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The path names something other than a regular file.
    #[error("not a regular file but a {kind}")]
    NotAFile {
        /// What it is: directory, character device, FIFO, socket, block device.
        kind: &'static str,
    },
    /// The file holds more than the reader allows.
    #[error("{size} B is more than the {limit} B allowed")]
    TooLarge {
        /// The file's size (or the bytes read before stopping).
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// What kind of file `meta` describes, in words.
pub fn kind(meta: &Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_char_device() {
            return "character device";
        }
        if t.is_block_device() {
            return "block device";
        }
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    if meta.is_dir() {
        "directory"
    } else if meta.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Checks that `path` (after symlinks) is a regular file of at most `limit` bytes.
pub fn check_regular(path: &Path, limit: u64) -> Result<(), ReadError> {
    let meta = std::fs::metadata(path)?;
    check(&meta, limit)
}

fn check(meta: &Metadata, limit: u64) -> Result<(), ReadError> {
    if !meta.is_file() {
        return Err(ReadError::NotAFile { kind: kind(meta) });
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    Ok(())
}

/// The bytes of the regular file at `path`, at most `limit` of them.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    // Checked before opening: opening a FIFO for reading waits for a writer.
    check_regular(path, limit)?;
    let file = File::open(path)?;
    // And again on the handle, in case the path changed in between.
    check(&file.metadata()?, limit)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Like [`read_bounded`], as UTF-8 text.
pub fn read_string_bounded(path: &Path, limit: u64) -> Result<String, ReadError> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|_| {
        ReadError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = std::env::temp_dir().join(format!("kvc-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        std::fs::write(&f, "hello").unwrap();
        assert_eq!(read_string_bounded(&f, 5).unwrap(), "hello");
        assert_eq!(
            read_bounded(&f, 4).unwrap_err().to_string(),
            "5 B is more than the 4 B allowed"
        );
        assert_eq!(
            read_bounded(&dir, 1 << 20).unwrap_err().to_string(),
            "not a regular file but a directory"
        );
        #[cfg(unix)]
        {
            assert_eq!(
                read_bounded(Path::new("/dev/zero"), 1 << 20)
                    .unwrap_err()
                    .to_string(),
                "not a regular file but a character device"
            );
            let link = dir.join("zero");
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            assert!(matches!(
                read_bounded(&link, 1 << 20),
                Err(ReadError::NotAFile { .. })
            ));
        }
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert!(read_string_bounded(&f, 5).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
