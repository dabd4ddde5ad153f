//! Every file of every target's seed corpus (`corpus/TARGET/`) run through the target's body
//! on stable Rust, without libFuzzer: the corpora, and the minimized inputs of fixed crashes
//! kept in them, are regression tests (`make test` runs this).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[test]
fn every_corpus_file_replays() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut failures = Vec::new();
    for &(name, body) in minivmm_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no seed corpus", dir.display());
        for file in &files {
            let data = std::fs::read(file).expect("corpus file");
            if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                failures.push(file.display().to_string());
            }
        }
        println!("{name}: {} inputs replayed", files.len());
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}
