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

/// Code without its comments, with every string and char literal emptied (so that neither a
/// `crate::` in a comment or a string nor a brace in one can mislead the readers below).
fn strip_comments_and_literals(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            'r' if matches!(c.get(i + 1), Some('"') | Some('#'))
                && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_')) =>
            {
                // A raw string r"…", r#"…"#: ends at a quote followed by as many hashes.
                let mut j = i + 1;
                let mut hashes = 0;
                while c.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push(c[i]);
                    i += 1;
                    continue;
                }
                j += 1;
                while j < c.len() && !(c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#'))) {
                    j += 1;
                }
                out.push_str("\"\"");
                i = j + 1 + hashes;
            }
            '"' => {
                let start = i + 1;
                i += 1;
                while i < c.len() && c[i] != '"' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                // A path in an attribute (`#[serde(with = "crate::x")]`) is a dependency: kept.
                let content: String = c[start..i.min(c.len())].iter().collect();
                let is_path = content
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                if is_path && (content.starts_with("crate::") || content.starts_with("super::")) {
                    out.push_str(&content);
                } else {
                    out.push_str("\"\"");
                }
                i += 1;
            }
            // A char literal ('x', '\n', '{'), not a lifetime ('a).
            '\'' if c.get(i + 2) == Some(&'\'') || c.get(i + 1) == Some(&'\\') => {
                i += 1;
                while i < c.len() && c[i] != '\'' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                out.push_str("' '");
                i += 1;
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// The production code of a file: comments and literals gone (see above), and every item under
/// `#[cfg(test)]` left out (a test module, a test-only function or impl), wherever it is.
fn production_code(text: &str) -> String {
    let code = strip_comments_and_literals(text);
    let mut out = String::with_capacity(code.len());
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        // The item ends at its first `;` outside braces, or where its first brace closes.
        let (mut depth, mut end) = (0usize, item.len());
        for (j, ch) in item.char_indices() {
            match ch {
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The top-level modules of the crate that `code`, the production code of `module`, names:
/// `crate::name`, groups `crate::{a::X, b}`, and `super::` paths that climb out of `module`'s
/// top-level module (`super::x` in a top-level module's file is `crate::x`). Whitespace around
/// `::` is ignored. Panics on `crate as …`, an alias that would hide every path through it.
fn crate_imports_of(module: &str, code: &str) -> BTreeSet<String> {
    let mut code = code.to_string();
    while code.contains(" ::") || code.contains(":: ") || code.contains("\n::") || code.contains("::\n") {
        code = code
            .replace(" ::", "::")
            .replace(":: ", "::")
            .replace("\n::", "::")
            .replace("::\n", "::");
    }
    assert!(
        !code.contains("crate as ") && !code.contains("extern crate self"),
        "`{module}` aliases `crate`: the import checks cannot follow the alias"
    );
    // `super::` climbing to the crate root becomes `crate::`.
    let depth = module.split("::").count();
    let climb = "super::".repeat(depth);
    if !module.is_empty() {
        code = code.replace(&climb, "crate::");
    }
    crate_imports(&code)
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
    // A glob from the crate root would hide which modules it reaches.
    let named = |s: &str| {
        assert!(
            !s.trim_start().starts_with('*'),
            "a glob import from `crate`: name the modules"
        );
        ident(s)
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
                            out.insert(named(&group[start..j]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.insert(named(&group[start..j]));
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
            }
            None => {
                out.insert(named(rest));
            }
        }
    }
    out.remove("");
    out
}

#[test]
fn production_code_skips_comments_literals_and_every_test_item() {
    let text = r#"use crate::a::X; // crate::b in a comment
/* crate::c
   in a block */ const S: &str = "crate::d {";
#[cfg(test)]
fn only_in_tests() { let _ = crate::e::f(); }
fn real() { let _ = crate::g::h('{'); }
#[cfg(test)]
mod tests;
fn more<'a>(x: &'a str) -> &'a str { crate::i::j(x) }
"#;
    let found: Vec<String> = crate_imports_of("m", &production_code(text)).into_iter().collect();
    assert_eq!(found, ["a", "g", "i"]);
}

#[test]
fn super_paths_out_of_the_top_level_module_count_as_crate_paths() {
    let code = "use super::config::Config;\nuse super :: dlq :: X;\n";
    let found: Vec<String> = crate_imports_of("dedupe", code).into_iter().collect();
    assert_eq!(found, ["config", "dlq"]);
    // In a sub-module, `super::` stays inside its top-level module; `super::super::` leaves it.
    let code = "use super::memory::M;\nuse super::super::dlq::X;\n";
    let found: Vec<String> = crate_imports_of("dedupe::config", code).into_iter().collect();
    assert_eq!(found, ["dlq"]);
    let grouped = "use crate::{ // the composed configuration\n config::Config, };";
    let found: Vec<String> = crate_imports_of("dlq", &production_code(grouped)).into_iter().collect();
    assert_eq!(found, ["config"]);
}

#[test]
fn paths_in_attribute_strings_count_and_globs_and_aliases_are_refused() {
    let code = "#[serde(with = \"crate::settings::x\", rename = \"crate\")]\nstruct S;\n";
    let found: Vec<String> = crate_imports_of("m", &production_code(code)).into_iter().collect();
    assert_eq!(found, ["settings"]);
    for bad in ["use crate::*;", "use crate::{*, a::B};", "extern crate self as me;"] {
        let caught = std::panic::catch_unwind(|| crate_imports_of("m", &production_code(bad)));
        assert!(caught.is_err(), "{bad} passed");
    }
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
            let path = module_of(file).unwrap_or_default();
            let outside: Vec<String> = crate_imports_of(&path, &production_code(&text))
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
            !crate_imports_of(&module, &production_code(&text)).contains("pipeline"),
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
        let imports: Vec<String> = crate_imports_of(&module, &production_code(&text))
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

/// For each top-level module with several files, the imports among its child files (`super::x`
/// and `crate::top::x` naming a sibling). A child using its parent (`mod.rs`) and the parent
/// declaring its children is the module tree, not a cycle between modules.
fn sibling_graphs() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let modules = source_modules();
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (module, file) in &modules {
        let parts: Vec<&str> = module.split("::").collect();
        if parts.len() < 2 || file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let (top, child) = (parts[0], parts[1]);
        let siblings: BTreeSet<&str> = modules
            .keys()
            .filter_map(|m| m.strip_prefix(&format!("{top}::")))
            .map(|rest| rest.split("::").next().unwrap_or_default())
            .filter(|s| *s != child && *s != "tests")
            .collect();
        let text = std::fs::read_to_string(file).expect("readable source");
        // Paths to the parent become `crate::` (and real crate paths something else), so that
        // the reader of `crate::` paths and groups names the siblings.
        let code = production_code(&text)
            .replace(&format!("crate::{top}::"), "super::")
            .replace("crate::", "root::")
            .replace(&"super::".repeat(parts.len() - 1), "crate::");
        let named: BTreeSet<String> = crate_imports(&code)
            .into_iter()
            .filter(|n| siblings.contains(n.as_str()))
            .collect();
        out.entry(top.to_string())
            .or_default()
            .entry(child.to_string())
            .or_default()
            .extend(named);
    }
    out
}

#[test]
fn the_files_of_a_module_import_one_another_without_a_cycle() {
    let graphs = sibling_graphs();
    assert!(graphs.len() >= 6, "read {} modules with several files", graphs.len());
    for (top, graph) in &graphs {
        if let Some(cycle) = find_cycle(graph) {
            panic!("import cycle between the files of `{top}`: {}", cycle.join(" -> "));
        }
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
