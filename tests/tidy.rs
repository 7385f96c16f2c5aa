//! The structure of `daemon/src`: no import cycle between top-level modules, and none of the arrows that
//! ARCHITECTURE.md ("Structural invariants") forbids.
//!
//! Read like rust-analyzer's tidy tests: the source files are scanned as text for `crate::` paths (`use` lines and
//! paths in code, comments skipped), and the rules are parsed from ARCHITECTURE.md, so the document and this test
//! cannot drift apart. A rule line reads ``- `a` imports only `b`, `c` `` or ``- `a` imports nothing from `b`,
//! `c` ``; `tokio` counts as a module there (a file that names `tokio::` imports it), and so does `json`, untyped
//! JSON: a file imports it when it names `serde_json::Value` or `serde_json::Map`, or builds with `json!`. A module
//! that does not import `json` only serializes typed values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `daemon/src` belongs to (`None` for `lib.rs`, the root, and the binaries).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// The top-level modules (and `tokio`) that `text` names through `crate::` paths, each with a line that does.
fn imports(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut push = |name: &str| {
            out.entry(name.to_owned())
                .or_insert_with(|| line.trim().to_owned());
        };
        if code.contains("tokio::") || code.contains("tokio_util::") {
            push("tokio");
        }
        let untyped = || {
            code.split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| w == "Value" || w == "Map")
        };
        if code.contains("json!") || (code.contains("serde_json::") && untyped()) {
            push("json");
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            // `$crate::`, `other_crate::` are not this crate.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the first segment of every item at the top level of the braces.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            push(item.trim().split("::").next().unwrap_or(""));
                            item.clear();
                        }
                        _ if depth == 0 => item.push(c),
                        _ => {}
                    }
                }
                let name = item.trim().split("::").next().unwrap_or("").to_owned();
                if !name.is_empty() {
                    push(&name);
                }
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                push(&name);
            }
        }
    }
    out.retain(|name, _| !name.is_empty() && !name.contains(':'));
    out
}

/// For each top-level module, the modules it imports and for each the files (with a line) that do.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    sources(src, &mut files);
    files.sort();
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let node = graph.entry(module.clone()).or_default();
        for (to, line) in imports(&text) {
            // Group items like `crate::{a::b}` leave `a::b`; keep the first segment.
            let to = to.split("::").next().unwrap().to_owned();
            if to != module {
                let rel = file.strip_prefix(src).unwrap().display().to_string();
                node.entry(to).or_default().insert(format!("{rel}: {line}"));
            }
        }
    }
    graph
}

/// Every cycle of `graph`, each once, as the list of modules around it.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    fn walk(
        graph: &Graph,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        for next in graph.get(at).into_iter().flat_map(|n| n.keys()) {
            if next == start {
                // Rotate so that the smallest name comes first: each cycle is reported once.
                let min = path.iter().enumerate().min_by_key(|(_, m)| *m).unwrap().0;
                let mut c = path[min..].to_vec();
                c.extend_from_slice(&path[..min]);
                found.insert(c);
            } else if !path.contains(next) && graph.contains_key(next) && next.as_str() > start {
                path.push(next.clone());
                walk(graph, start, next, path, found);
                path.pop();
            }
        }
    }
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        walk(graph, start, start, &mut vec![start.clone()], &mut found);
    }
    found.into_iter().collect()
}

/// A rule from ARCHITECTURE.md.
#[derive(Debug)]
enum Rule {
    Only(String, BTreeSet<String>),
    Never(String, BTreeSet<String>),
    /// A cycle not yet broken (``- cycle still to break: `a`, `b` ``); the test fails once it is gone, so that
    /// the line is removed with it.
    Known(BTreeSet<String>),
}

/// The rules of ARCHITECTURE.md's "Structural invariants" section.
fn rules(architecture: &str) -> Vec<Rule> {
    let section = architecture
        .split("\n## ")
        .find(|s| s.starts_with("Structural invariants"))
        .expect("ARCHITECTURE.md has a \"Structural invariants\" section");
    let names = |s: &str| -> BTreeSet<String> {
        s.split('`').skip(1).step_by(2).map(str::to_owned).collect()
    };
    let mut rules = Vec::new();
    for line in section.lines() {
        if let Some(list) = line.strip_prefix("- cycle still to break: ") {
            rules.push(Rule::Known(names(list.split(':').next().unwrap())));
            continue;
        }
        let Some(line) = line.strip_prefix("- `") else {
            continue;
        };
        let Some((modules, rule)) = line.split_once("` imports ") else {
            continue;
        };
        let from: Vec<String> = modules.split("`, `").map(str::to_owned).collect();
        let rule = rule.split(':').next().unwrap();
        for m in from {
            if let Some(list) = rule.strip_prefix("only") {
                rules.push(Rule::Only(m, names(list)));
            } else if let Some(list) = rule.strip_prefix("nothing from") {
                rules.push(Rule::Never(m, names(list)));
            }
        }
    }
    rules
}

/// What is wrong with `graph` under `rules`: every cycle and every forbidden arrow, with the lines that make it.
fn problems(graph: &Graph, rules: &[Rule]) -> Vec<String> {
    let mut out = Vec::new();
    let known: Vec<&BTreeSet<String>> = rules
        .iter()
        .filter_map(|r| match r {
            Rule::Known(c) => Some(c),
            _ => None,
        })
        .collect();
    let cycles = cycles(graph);
    for k in &known {
        if !cycles
            .iter()
            .any(|c| c.iter().cloned().collect::<BTreeSet<_>>() == **k)
        {
            out.push(format!(
                "the cycle {k:?} that ARCHITECTURE.md lists is gone: remove its line"
            ));
        }
    }
    for cycle in cycles {
        if known
            .iter()
            .any(|k| cycle.iter().cloned().collect::<BTreeSet<_>>() == **k)
        {
            continue;
        }
        let mut text = format!("import cycle: {} -> {}", cycle.join(" -> "), cycle[0]);
        for (from, to) in cycle.iter().zip(cycle.iter().cycle().skip(1)) {
            if let Some(lines) = graph[from].get(to) {
                text.push_str(&format!("\n    {from} -> {to}: {}", lines.first().unwrap()));
            }
        }
        out.push(text);
    }
    for rule in rules {
        // `Only` forbids what is not in its list, `Never` what is.
        let (from, list, listed_is_bad) = match rule {
            Rule::Only(from, allowed) => (from, allowed, false),
            Rule::Never(from, forbidden) => (from, forbidden, true),
            Rule::Known(_) => continue,
        };
        let bad = graph
            .get(from)
            .into_iter()
            .flat_map(|n| n.keys())
            .filter(|to| list.contains(*to) == listed_is_bad);
        for to in bad {
            for line in &graph[from][to] {
                out.push(format!("forbidden arrow {from} -> {to} ({rule:?}): {line}"));
            }
        }
    }
    out
}

#[test]
fn top_level_modules_have_no_cycles_and_no_forbidden_arrows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let rules = rules(&architecture);
    assert!(
        rules.len() >= 2,
        "ARCHITECTURE.md's structural invariants name no rules: {rules:?}"
    );
    let graph = graph(&root.join("daemon/src"));
    let mut problems = problems(&graph, &rules);
    for rule in &rules {
        let modules: Vec<&String> = match rule {
            Rule::Only(m, _) | Rule::Never(m, _) => vec![m],
            Rule::Known(c) => c.iter().collect(),
        };
        for m in modules.into_iter().filter(|m| !graph.contains_key(*m)) {
            problems.push(format!(
                "ARCHITECTURE.md names a module `{m}` that daemon/src does not have"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn untyped_json_counts_as_the_module_json() {
    let check = |text: &str, expected: bool| {
        assert_eq!(imports(text).contains_key("json"), expected, "{text}");
    };
    check("use serde_json::{Value, json};", true);
    check("let v: serde_json::Map<String, _> = m;", true);
    check("let answer = json!({\"ok\": true});", true);
    check("serde_json::to_writer(&mut line, &head)?;", false);
    check("record: Box<serde_json::value::RawValue>,", false);
    check("// json!({}) in a comment", false);
    check("let v: Value = other_crate::parse();", false);
}

#[test]
fn the_checker_sees_groups_cycles_and_arrows() {
    let found = imports(
        "use crate::log::{chain, files};\nuse crate::{a, b::{c, d}, e};\n// crate::comment\nlet x = $crate::m;\nfoo(crate::f::g); tokio::spawn(x);",
    );
    let names: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(names, ["a", "b", "e", "f", "log", "tokio"]);
    let mut graph = Graph::new();
    let mut arrow = |from: &str, to: &str| {
        graph
            .entry(from.into())
            .or_default()
            .entry(to.into())
            .or_default()
            .insert(format!("{from}.rs: use crate::{to};"));
    };
    arrow("a", "b");
    arrow("b", "c");
    arrow("c", "a");
    arrow("c", "d");
    arrow("d", "tokio");
    graph.entry("tokio".into()).or_default();
    assert_eq!(cycles(&graph), [["a", "b", "c"]]);
    let doc = "# x\n## Structural invariants\n- `d` imports nothing from `tokio`: no runtime\n- `c`, `b` imports only `a`\n## Next\n- `a` imports only `b`\n";
    let known = doc.replace(
        "## Next",
        "- cycle still to break: `c`, `a`, `b`: later\n- cycle still to break: `d`, `c`\n## Next",
    );
    let problems_known = problems(&graph, &rules(&known));
    assert_eq!(problems_known.len(), 4, "{problems_known:#?}");
    assert!(problems_known[0].contains("{\"c\", \"d\"}") && problems_known[0].contains("is gone"));
    let rules = rules(doc);
    let problems = problems(&graph, &rules);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(problems[0].starts_with("import cycle: a -> b -> c -> a"));
    assert!(problems[1].contains("forbidden arrow d -> tokio"));
    assert!(problems[2].contains("forbidden arrow c -> d"));
    assert!(problems[3].contains("forbidden arrow b -> c"));
}
