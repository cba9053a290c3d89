//! The glommio shell: one pinned executor per core, the cross-core mesh, TCP and WebSocket tasks.
//!
//! Invariant: the only module that imports glommio, socket2 or reads the clock; it feeds the
//! sans-IO [`CoreState`](crate::core::CoreState) one input at a time and drains every output before awaiting again.
//!
//! What starts what, top down (see ARCHITECTURE.md, "The shell"): [`start`] starts one executor per
//! core running `core_task::run_core`, which starts the core's tasks (accept, mesh, UDP, timers and
//! the work task that spawns what the core asks for: agent dials, tool calls). Imports run the same
//! way, down to the modules every task shares (`shared`, `socket`, `outbox`, `message`, `work`, …);
//! no module imports one that imports it back, which `tests::imports_have_no_cycle` checks.

mod agent;
mod clock;
mod core_task;
mod dial;
mod fetch;
mod global;
mod handoff;
mod mesh;
mod message;
mod outbox;
mod rtc;
mod service;
mod shared;
mod socket;
mod start;
mod tcp;
mod tls;
mod tools;
mod upgrade;
mod work;
mod ws;

pub use crate::proto::http_client::Response as FetchResponse;
pub use fetch::{FetchError, FetchRequest};
pub use global::{CoreStats, FrameDir};
pub use service::{ControlService, Outcome, Request};
pub use shared::CoreHandle;
pub use start::{available_cores, raise_file_limit, start, Relay, ShutdownHandle, StartError};
pub use tls::{load_system_roots, server_config, trust_extra_roots};
pub use upgrade::{SocketKind, Upgrade};

#[cfg(test)]
mod tests {
    //! The shell's import structure: the modules of `src/shell/` and the `use super::…` /
    //! `crate::shell::…` paths between them, read from the sources.

    use std::collections::{BTreeMap, BTreeSet};

    /// Modules each module of the shell names (`super::x`, `crate::shell::x`; an item of `mod.rs`
    /// counts as `mod`; `mod.rs` names its children in `use x::…`), from `(module, source)` pairs. Test modules (`#[cfg(test)]` onward) are
    /// left out: their `super` is the file itself.
    fn edges(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
        let modules: BTreeSet<&str> = files.iter().map(|(m, _)| m.as_str()).collect();
        let mut graph = BTreeMap::new();
        for (module, source) in files {
            let code = source.split("#[cfg(test)]").next().unwrap_or_default();
            let code: String =
                code.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
            let mut named = BTreeSet::new();
            // `mod.rs` names its children directly (`pub use start::start`).
            let prefixes: &[&str] = if module == "mod" { &["use "] } else { &["super::", "crate::shell::"] };
            for &prefix in prefixes {
                let mut rest = code.as_str();
                while let Some(at) = rest.find(prefix) {
                    rest = &rest[at + prefix.len()..];
                    for first in first_segments(rest) {
                        let target = match first.as_str() {
                            m if modules.contains(m) => first,
                            // `use crate::…`, `use std::…` in `mod.rs`: outside the shell.
                            _ if module == "mod" => continue,
                            _ => "mod".to_owned(),
                        };
                        if target != "self" && &target != module {
                            named.insert(target);
                        }
                    }
                }
            }
            graph.insert(module.clone(), named);
        }
        graph
    }

    /// The first path segment of each item of the path that starts `rest`: `x::y` gives `x`,
    /// `{a, b::c, D}` gives `a`, `b`, `D`.
    fn first_segments(rest: &str) -> Vec<String> {
        let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
        let Some(group) = rest.strip_prefix('{') else {
            return vec![ident(rest)];
        };
        let (mut depth, mut items, mut item) = (0usize, Vec::new(), String::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                _ if depth == 0 => item.push(c),
                _ => {}
            }
        }
        items.push(item);
        items.iter().map(|i| ident(i.trim())).filter(|i| !i.is_empty()).collect()
    }

    /// A cycle in `graph`, as the modules along it, if there is one.
    fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|n| n == node) {
                let mut cycle = path[at..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            if done.contains(node) {
                return None;
            }
            path.push(node.to_owned());
            for next in graph.get(node).into_iter().flatten() {
                if let Some(cycle) = visit(next, graph, path, done) {
                    return Some(cycle);
                }
            }
            path.pop();
            done.insert(node.to_owned());
            None
        }
        let mut done = BTreeSet::new();
        graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
    }

    fn shell_sources() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/shell");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("src/shell is readable") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                let module = path.file_stem().and_then(|s| s.to_str()).expect("a UTF-8 name").to_owned();
                files.push((module, std::fs::read_to_string(&path).expect("a readable source")));
            }
        }
        files
    }

    /// No module of the shell imports one that imports it back, directly or through others.
    #[test]
    fn imports_have_no_cycle() {
        let graph = edges(&shell_sources());
        assert!(graph.len() > 10, "the shell's modules were not found: {graph:?}");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("import cycle in engine/src/shell: {}\nedges: {graph:#?}", cycle.join(" -> "));
        }
    }

    /// Only the top starts a core: `core_task` (what `run_core` starts) is imported by `start`
    /// alone, and `start` by nothing but `mod.rs`'s re-exports.
    #[test]
    fn run_core_is_imported_only_from_the_top() {
        let graph = edges(&shell_sources());
        let importers =
            |m: &str| graph.iter().filter(|(_, to)| to.contains(m)).map(|(from, _)| from.as_str()).collect::<Vec<_>>();
        assert_eq!(importers("core_task"), ["start"]);
        assert_eq!(importers("start"), ["mod"]);
    }

    /// The checker itself: paths, groups and items of `mod.rs` become edges, test modules and
    /// comments do not, and a cycle through four modules is found.
    #[test]
    fn checker_finds_cycles() {
        let file = |m: &str, s: &str| (m.to_owned(), s.to_owned());
        let files = [
            file("mod", "mod a;\npub use a::Thing;\n"),
            file("a", "use super::{b, c::{X, Y}};\n// use super::d;\n"),
            file("b", "fn f() { super::c::go(); }\n#[cfg(test)]\nmod tests { use super::*; use super::a; }\n"),
            file("c", "use crate::shell::Thing;\n"),
            file("d", ""),
        ];
        let graph = edges(&files);
        assert_eq!(graph["a"], BTreeSet::from(["b".to_owned(), "c".to_owned()]));
        assert_eq!(graph["b"], BTreeSet::from(["c".to_owned()]));
        assert_eq!(graph["c"], BTreeSet::from(["mod".to_owned()]));
        assert_eq!(find_cycle(&graph), Some(["a", "b", "c", "mod", "a"].map(str::to_owned).to_vec()));
        let acyclic = &files[1..];
        assert_eq!(find_cycle(&edges(acyclic)), None);
    }
}
