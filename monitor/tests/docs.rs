//! The documents say what the code does: numbers in prose that come from the code's
//! constants, every section a comment cites, every file a document links to. Drift fails here.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use monitor_common::{KernelOffsets, STATE_EVENT_SIZE, STATE_EVENT_WITH_STATS_SIZE};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Ring bytes one record takes: the record and the ring's header, rounded up to 8.
fn in_ring(record: usize) -> usize {
    (monitor::source::HEADER_BYTES + record).next_multiple_of(8)
}

#[test]
fn record_sizes_and_field_counts_in_prose_are_the_codes() {
    let (plain, with_counters) = (in_ring(STATE_EVENT_SIZE), in_ring(STATE_EVENT_WITH_STATS_SIZE));
    let readme = read("README.md");
    let ring_row = format!(
        "{plain} bytes per transition ({with_counters} for handshake completions and closes)"
    );
    assert!(readme.contains(&ring_row), "README's --ring-bytes row should say: {ring_row}");
    let help = monitor::cli::Cli::command()
        .find_subcommand_mut("run")
        .unwrap()
        .render_long_help()
        .to_string();
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let said =
        format!("takes {plain} bytes ({with_counters} for handshake completions and closes)");
    assert!(help.contains(&said), "`tcpmon run --help` should say: {said}\n{help}");
    let fields = format!("all {} struct fields found", KernelOffsets::FIELDS.len());
    assert!(readme.contains(&fields), "README's `tcpmon check` example should say: {fields}");
}

/// The headings of a Markdown document, without their `#`s (not comments in code blocks).
fn headings(document: &str) -> Vec<String> {
    let mut in_code = false;
    let mut found = Vec::new();
    for line in document.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            found.push(line.trim_start_matches('#').trim().to_owned());
        }
    }
    found
}

/// Every file of the repository a citation can be in (sources, manifests, documents).
fn cited_from() -> Vec<PathBuf> {
    let root = workspace();
    let mut files =
        vec![root.join("README.md"), root.join("BENCHMARKS.md"), root.join("Cargo.toml")];
    let mut pending: Vec<PathBuf> =
        ["monitor", "monitor-common", "monitor-ebpf", "xtask", "deploy", "docs"]
            .iter()
            .map(|dir| root.join(dir))
            .collect();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() && name != "target" && name != "fixtures" {
                pending.push(path);
            } else if [".rs", ".toml", ".md", ".yaml", ".yml", ".service"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                files.push(path);
            }
        }
    }
    files
}

/// The section names cited as `DOCUMENT, "Section"` in `text`, with comment markers and line
/// breaks inside the name taken out.
fn citations(text: &str, document: &str) -> Vec<String> {
    let marker = format!("{document}, \"");
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&marker) {
        let after = &rest[at + marker.len()..];
        let Some(end) = after.find('"') else { break };
        let name: Vec<&str> = after[..end]
            .lines()
            .map(|line| line.trim().trim_start_matches("//!").trim_start_matches("///"))
            .map(|line| line.trim_start_matches("//").trim_start_matches('#').trim())
            .collect();
        found.push(name.join(" "));
        rest = &after[end..];
    }
    found
}

#[test]
fn every_cited_section_exists_and_nothing_cites_a_document_outside_the_repository() {
    let documents = [
        ("README", "README.md"),
        ("ARCHITECTURE.md", "docs/ARCHITECTURE.md"),
        ("TESTING.md", "docs/TESTING.md"),
    ];
    let mut checked = 0;
    for file in cited_from() {
        let text = std::fs::read_to_string(&file).unwrap();
        let shown = file.strip_prefix(workspace()).unwrap_or(&file).display().to_string();
        // Spelt in two parts so that this file does not match itself.
        for outside in [["DESIGN", ".md"].concat(), ["shared", "/"].concat()] {
            assert!(!text.contains(&outside), "{shown} cites {outside}, outside the repository");
        }
        for (cited_as, path) in documents {
            let sections = headings(&read(path));
            for section in citations(&text, cited_as) {
                assert!(
                    sections.contains(&section),
                    "{shown} cites {path}, \"{section}\", which has no such section: {sections:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "only {checked} citations found: is the search broken?");
}

#[test]
fn every_relative_link_of_the_documents_leads_to_a_file() {
    for document in ["README.md", "BENCHMARKS.md", "docs/ARCHITECTURE.md", "docs/TESTING.md"] {
        let text = read(document);
        let base = workspace().join(document).parent().unwrap().to_path_buf();
        for link in text.split("](").skip(1).filter_map(|rest| rest.split(')').next()) {
            if link.starts_with("http") || link.starts_with('#') {
                continue;
            }
            let target = base.join(link.split('#').next().unwrap());
            assert!(target.exists(), "{document} links to {link}, which does not exist");
        }
    }
}
