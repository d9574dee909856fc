//! The `ladic-serve` binary's `caption` command and its start-up errors.

mod common;

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ladic-serve"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn caption_prints_one_line_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.jpg");
    std::fs::write(&a, common::scene_png(0)).unwrap();
    std::fs::write(
        &b,
        common::encode(&common::scene(1), image::ImageFormat::Jpeg),
    )
    .unwrap();
    let out = bin()
        .args(["caption", "--steps", "3", "--intra-op-threads", "1"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines.iter().all(|l| l.ends_with('.')));

    // Same seed, same captions.
    let again = bin()
        .args(["caption", "--steps", "3", "--intra-op-threads", "1"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);
}

#[test]
fn missing_onnxruntime_is_a_one_line_error() {
    let out = bin()
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .args(["caption", "tests/fixtures/scenes/test-seen-000.png"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("scripts/fetch-onnxruntime.sh"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

/// `caption` with `args` and no ONNX Runtime at all: it must fail with exit status 1
/// and one line on stderr, which is returned.
fn caption_without_onnx_runtime(args: &[&str]) -> String {
    let out = bin()
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .arg("caption")
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

/// A file that cannot be read is reported before the model loads (which takes long at
/// full size): here with no ONNX Runtime at all.
#[test]
fn caption_reads_its_files_before_loading_the_model() {
    let stderr = caption_without_onnx_runtime(&[
        "tests/fixtures/scenes/test-seen-000.png",
        "/nonexistent/photo.png",
    ]);
    assert!(
        stderr.starts_with("error: cannot read /nonexistent/photo.png"),
        "{stderr}"
    );
}

/// So are a flag's value out of range and a file that is not an image.
#[test]
fn caption_checks_its_parameters_and_images_before_loading_the_model() {
    let stderr =
        caption_without_onnx_runtime(&["--steps", "0", "tests/fixtures/scenes/test-seen-000.png"]);
    assert!(stderr.contains("--steps must be"), "{stderr}");

    let stderr =
        caption_without_onnx_runtime(&["tests/fixtures/scenes/test-seen-000.png", "Cargo.toml"]);
    assert!(
        stderr.starts_with("error: cannot use image Cargo.toml: unrecognised"),
        "{stderr}"
    );
}

#[test]
fn unknown_bundle_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("manifest.json"),
        r#"{"format": "ladic-bundle", "format_version": 99}"#,
    )
    .unwrap();
    let out = bin()
        .args(["caption", "--bundle"])
        .arg(dir.path())
        .arg("tests/fixtures/scenes/test-seen-000.png")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("format_version 99"), "{stderr}");
}

/// Runs `cmd`, which should end at once; kills it and fails if it is still running
/// after 20 s (a server that started instead of refusing its flags).
fn output_soon(cmd: &mut Command) -> std::process::Output {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 20 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The process failed, and its error line contains each of `needles`.
fn assert_refused(out: &std::process::Output, needles: &[&str]) {
    let line = common::refusal_line(out);
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
}

#[test]
fn serve_refuses_limits_that_would_refuse_every_request() {
    for flag in [
        "--request-timeout-ms",
        "--max-request-timeout-ms",
        "--max-image-pixels",
        "--max-image-side",
        "--max-body-bytes",
        "--queue-size",
        "--max-batch-images",
        "--body-memory-mib",
    ] {
        let out = output_soon(bin().args(["serve", "--bind", "127.0.0.1:0", flag, "0"]));
        assert_refused(&out, &[flag, "at least 1"]);
    }
    // A queue smaller than the largest batch request.
    let out = output_soon(bin().args(["serve", "--bind", "127.0.0.1:0", "--queue-size", "8"]));
    assert_refused(&out, &["--queue-size 8", "--max-batch-images 16"]);
    // The same through the environment.
    let out = output_soon(
        bin()
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("LADIC_REQUEST_TIMEOUT_MS", "0"),
    );
    assert_refused(&out, &["--request-timeout-ms", "at least 1"]);
}

#[test]
fn serve_refuses_a_default_deadline_above_the_largest() {
    let out = output_soon(bin().args([
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--request-timeout-ms",
        "5000",
        "--max-request-timeout-ms",
        "4000",
    ]));
    assert_refused(
        &out,
        &["--request-timeout-ms 5000", "--max-request-timeout-ms 4000"],
    );
}

#[test]
fn serve_refuses_a_body_budget_too_small_for_the_largest_body() {
    // 3 x 20 MiB (a JSON body's copies) does not fit in 50 MiB.
    let out = output_soon(bin().args([
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--max-body-bytes",
        "20971520",
        "--body-memory-mib",
        "50",
    ]));
    assert_refused(
        &out,
        &["--body-memory-mib 50", "3 x --max-body-bytes (60 MiB)"],
    );
}

#[test]
fn caption_checks_its_parameters_as_the_http_api_does() {
    // Refused before any image is decoded or captioned.
    for (args, message) in [
        (
            &["--guidance=nan"][..],
            "guidance must be between 0 and 10, got NaN",
        ),
        (
            &["--guidance", "-5"],
            "guidance must be between 0 and 10, got -5",
        ),
        (&["--guidance=1e9"], "guidance must be between 0 and 10"),
        (
            &["--guidance=inf"],
            "guidance must be between 0 and 10, got inf",
        ),
        (
            &["--steps", "5000"],
            "steps must be between 1 and 100, got 5000",
        ),
        (
            &["--steps", "0"],
            "--steps must be between 1 and 100, got 0",
        ),
        (
            &["--candidates", "9"],
            "candidates must be between 1 and 8, got 9",
        ),
    ] {
        let out = output_soon(
            bin()
                .arg("caption")
                .args(args)
                .arg("tests/fixtures/scenes/test-seen-000.png"),
        );
        assert_refused(&out, &[message]);
    }
}
