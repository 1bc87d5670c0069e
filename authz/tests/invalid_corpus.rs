//! `policies/invalid/`: every file must fail to load with exactly the messages in its
//! `.expected` file (`{file}` stands for the file's path). Regenerate after a deliberate message
//! change with `WARDEN_BLESS=1 cargo test -p warden-authz --test invalid_corpus`, then review
//! the diff.

use std::path::{Path, PathBuf};
use warden_authz::load_paths;

#[test]
fn every_invalid_policy_fails_with_its_expected_messages() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "corpus has only {} files", files.len());
    let bless = std::env::var_os("WARDEN_BLESS").is_some();
    let mut failures = Vec::new();
    for f in &files {
        let got = match load_paths(&[f]) {
            Ok(_) => "<loaded without error>\n".to_string(),
            Err(e) => format!("{}\n", e.to_string().replace(f.to_str().unwrap(), "{file}")),
        };
        let exp_path = f.with_extension("expected");
        if bless {
            std::fs::write(&exp_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&exp_path).unwrap_or_else(|_| format!("<missing {}>", exp_path.display()));
        if got != want {
            failures.push(format!("{}:\n  want: {want}  got:  {got}", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
