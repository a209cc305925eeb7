//! Holds `docs/ARCHITECTURE.md` to the code: its code map names every module and sub-module under
//! `src/`, and its boundaries table says what each listed module may import from the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn architecture() -> String {
    std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md")
}

/// The part of the page from the heading `## {name}` to the next `## ` heading.
fn section<'a>(doc: &'a str, name: &str) -> &'a str {
    let heading = format!("\n## {name}\n");
    let start = doc.find(&heading).unwrap_or_else(|| panic!("no section `## {name}`")) + heading.len();
    let rest = &doc[start..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src/` (`pipeline/lane.rs` → `pipeline::lane`); `None` for the
/// crate roots.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root().join("src")).expect("under src/");
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [only] if only == "lib" || only == "main" => None,
        _ => Some(parts.join("::")),
    }
}

fn source_modules() -> BTreeMap<String, PathBuf> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files
        .into_iter()
        .filter_map(|f| module_of(&f).map(|m| (m, f)))
        .collect()
}

#[test]
fn the_code_map_names_every_module() {
    let doc = architecture();
    let map = section(&doc, "Code map");
    let missing: Vec<String> = source_modules()
        .into_keys()
        // Unit-test files (`tests.rs`) go with the module they test.
        .filter(|m| !m.ends_with("::tests"))
        .filter(|m| !map.contains(&format!("`{m}`")) && !map.contains(&format!("`{m}::")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md's code map does not name these modules: {missing:?}"
    );
}

/// The production code of a file: everything before its first `#[cfg(test)]`.
fn production_code(text: &str) -> &str {
    &text[..text.find("#[cfg(test)]").unwrap_or(text.len())]
}

/// The top-level modules of the crate a piece of code names as `crate::name` or in a group
/// `crate::{a::X, b}`.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                // The group's top-level items: split at commas outside nested braces.
                let (mut depth, mut start) = (0usize, 0usize);
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            out.insert(ident(&group[start..j]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.insert(ident(&group[start..j]));
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
            }
            None => {
                out.insert(ident(rest));
            }
        }
    }
    out.remove("");
    out
}

#[test]
fn crate_imports_reads_paths_and_groups() {
    let code = "use crate::event::Event;\nuse crate::{offsets::{Epoch, RecordId}, settings::Secret, batch};\n";
    let found: Vec<String> = crate_imports(code).into_iter().collect();
    assert_eq!(found, ["batch", "event", "offsets", "settings"]);
}

#[test]
fn each_module_imports_only_what_its_boundary_allows() {
    let doc = architecture();
    let table = section(&doc, "Boundaries");
    let modules = source_modules();
    let mut checked = 0;
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let module = cells[1].trim_matches('`');
        let allowed: BTreeSet<String> = cells[2]
            .split(':')
            .next()
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().trim_matches('`').to_string())
            .filter(|m| !m.is_empty() && m != "nothing")
            .collect();
        let files: Vec<&PathBuf> = modules
            .iter()
            .filter(|(m, _)| *m == module || m.starts_with(&format!("{module}::")))
            .map(|(_, f)| f)
            .collect();
        assert!(
            !files.is_empty(),
            "the boundaries table names `{module}`, which has no file"
        );
        for file in files {
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(file).expect("readable source");
            let outside: Vec<String> = crate_imports(production_code(&text))
                .into_iter()
                .filter(|m| m != module && !allowed.contains(m))
                .collect();
            assert!(
                outside.is_empty(),
                "{} imports {outside:?}, outside the boundary of `{module}` in docs/ARCHITECTURE.md",
                file.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "the boundaries table lists {checked} modules");
}

#[test]
fn no_stage_imports_the_pipeline() {
    for (module, file) in source_modules() {
        if module == "demo" || module.starts_with("pipeline") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        assert!(
            !crate_imports(&text).contains("pipeline"),
            "{} imports `pipeline`: stages must not know how they are wired",
            file.display()
        );
    }
}

/// The top-level modules each top-level module's production code imports.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in source_modules() {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let top = module.split("::").next().unwrap_or_default().to_string();
        let text = std::fs::read_to_string(&file).expect("readable source");
        let imports: Vec<String> = crate_imports(production_code(&text))
            .into_iter()
            .filter(|m| *m != top)
            .collect();
        graph.entry(top).or_default().extend(imports);
    }
    graph
}

/// A cycle in `graph`, as the modules along it, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_import_one_another_without_a_cycle() {
    let graph = import_graph();
    assert!(graph.len() >= 15, "read {} modules", graph.len());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let edge = |a: &str, b: &[&str]| (a.to_string(), b.iter().map(|s| s.to_string()).collect());
    let acyclic: BTreeMap<String, BTreeSet<String>> = [
        edge("config", &["source"]),
        edge("source", &["offsets"]),
        edge("offsets", &[]),
    ]
    .into();
    assert_eq!(find_cycle(&acyclic), None);
    let cyclic: BTreeMap<String, BTreeSet<String>> = [
        edge("config", &["source"]),
        edge("source", &["settings", "config"]),
        edge("settings", &[]),
    ]
    .into();
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["config".into(), "source".into(), "config".into()])
    );
}
