//! Embeds the schemas' migrations (`migrations/`, `migrations/postgres/`,
//! `migrations/commands/`) as `store::migrations` reads them: a table per
//! schema of (version, the file name after `<version>_`, text), sorted by
//! version. Files not
//! named `<version>_<description>.sql` are skipped, as sqlx skips them; a
//! version that is not an integer fails the build.

use std::fmt::Write;
use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let mut out = String::new();
    for (table, dir) in [
        ("SQLITE", ""),
        ("POSTGRES", "postgres"),
        ("COMMANDS", "commands"),
    ] {
        let dir = root.join(dir);
        // A directory: cargo reruns this when any file under it changes.
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<(i64, String, PathBuf)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|entry| entry.expect("a readable directory entry").path())
            .filter(|path| path.is_file())
            .filter_map(|path| {
                // As sqlx's reader: other files (an editor's swap file, a
                // README) are not migrations.
                let name = path.file_name()?.to_str()?.to_owned();
                let (version, rest) = name.split_once('_')?;
                if !rest.ends_with(".sql") {
                    return None;
                }
                let version = version
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: the version is not an integer"));
                Some((version, rest.to_owned(), path))
            })
            .collect();
        files.sort();
        // Writes to a String cannot fail.
        writeln!(out, "pub(super) const {table}: &[(i64, &str, &str)] = &[").unwrap();
        for (version, rest, path) in files {
            let path = path.canonicalize().expect("a migration's path");
            writeln!(
                out,
                "    ({version}, {rest:?}, include_str!({:?})),",
                path.display().to_string()
            )
            .unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("migrations.rs");
    std::fs::write(dest, out).expect("writing the migrations' table");
}
