//! docs/architecture.md follows an event through the code, naming files, actors, messages and
//! functions; this keeps it true. Every `path/like/this.rs` it puts in backticks must exist,
//! and every backticked name that looks like a Rust item must be found in the code of `src/`
//! and `actors/src/` (whole-line comments left out, so a name kept only in a comment does not
//! count):
//!
//! - `module::item` (lower-case first): a file `module.rs` (or `module/mod.rs`) with `item` in it;
//! - `Type::function`: `Type`, and a `fn function`; `Type::Variant`: both names;
//! - `Type`, `Type {fields}`, `Type(..)`, `Type<..>`: the name (and the paths and types inside);
//! - `function(..)` and snake_case names with an underscore (`emit_now`): the name.
//!
//! Plain lower-case words (`started`, `cut`), flags, routes and JSON are not checked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const DOC: &str = "docs/architecture.md";
const SOURCE_DIRS: [&str; 2] = ["src", "actors/src"];

/// One thing the document names, and what must be true of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Claim {
    /// A file, relative to the repository root.
    File(String),
    /// A name found in the code.
    Name(String),
    /// A function defined in the code (`fn name`).
    Function(String),
    /// A name found in the code of a module (`module.rs` or `module/mod.rs`).
    InModule { module: String, item: String },
}

struct Code {
    /// Each source file and its code (whole-line comments left out).
    files: Vec<(PathBuf, String)>,
    names: BTreeSet<String>,
}

impl Code {
    fn load(root: &Path) -> Code {
        let mut paths = Vec::new();
        for dir in SOURCE_DIRS {
            rust_files(&root.join(dir), &mut paths);
        }
        assert!(!paths.is_empty(), "no .rs file under {SOURCE_DIRS:?}");
        let files: Vec<(PathBuf, String)> = paths
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
                (p, without_comment_lines(&text))
            })
            .collect();
        let names = files
            .iter()
            .flat_map(|(_, code)| identifiers(code))
            .collect();
        Code { files, names }
    }

    fn defines_fn(&self, name: &str) -> bool {
        self.files.iter().any(|(_, code)| {
            identifier_positions(code, name).any(|at| code[..at].trim_end().ends_with("fn"))
        })
    }

    fn module_has(&self, module: &str, item: &str) -> bool {
        self.files
            .iter()
            .filter(|(p, _)| {
                p.file_stem().is_some_and(|s| s == module)
                    || (p.file_name().is_some_and(|f| f == "mod.rs")
                        && p.parent()
                            .and_then(Path::file_name)
                            .is_some_and(|d| d == module))
            })
            .any(|(_, code)| identifiers(code).any(|w| w == item))
    }

    /// Why `claim` is false, or None when it holds.
    fn check(&self, root: &Path, claim: &Claim) -> Option<String> {
        let ok = match claim {
            Claim::File(path) => root.join(path).is_file(),
            Claim::Name(name) => self.names.contains(name),
            Claim::Function(name) => self.defines_fn(name),
            Claim::InModule { module, item } => self.module_has(module, item),
        };
        (!ok).then(|| match claim {
            Claim::File(path) => format!("`{path}`: no such file"),
            Claim::Name(name) => format!("`{name}`: not found in the code"),
            Claim::Function(name) => format!("`{name}`: no `fn {name}` in the code"),
            Claim::InModule { module, item } => {
                format!("`{module}::{item}`: no module `{module}` with `{item}` in it")
            }
        })
    }
}

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text without its whole-line comments (`//`, `///`, `//!`).
fn without_comment_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifiers in `code`, in order.
fn identifiers(code: &str) -> impl Iterator<Item = String> + '_ {
    code.split(|c: char| !is_ident_char(c))
        .filter(|w| w.starts_with(is_ident_start))
        .map(str::to_string)
}

/// Byte offsets where `name` occurs in `code` as a whole identifier.
fn identifier_positions<'a>(code: &'a str, name: &'a str) -> impl Iterator<Item = usize> + 'a {
    code.match_indices(name)
        .map(|(at, _)| at)
        .filter(move |&at| {
            let before = code[..at].chars().next_back();
            let after = code[at + name.len()..].chars().next();
            !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char)
        })
}

/// The inline code spans of a Markdown text outside fenced blocks, white space collapsed (a
/// span may go over a line break).
fn code_spans(markdown: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

fn is_camel(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().any(|c| c.is_ascii_lowercase())
}

fn is_snake(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The leading `ident(::ident)*` of `s`, and what follows it.
fn leading_path(s: &str) -> (&str, &str) {
    let mut end = 0;
    loop {
        let rest = &s[end..];
        if !rest.starts_with(is_ident_start) {
            break;
        }
        end += rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
        if s[end..].starts_with("::") && s[end + 2..].starts_with(is_ident_start) {
            end += 2;
        } else {
            break;
        }
    }
    (&s[..end], &s[end..])
}

/// What `a::b::c` claims.
fn path_claims(path: &str, out: &mut Vec<Claim>) {
    let segments: Vec<&str> = path.split("::").collect();
    let (first, members) = segments.split_first().expect("a path has a segment");
    if is_snake(first) {
        for item in members {
            out.push(Claim::InModule {
                module: first.to_string(),
                item: item.to_string(),
            });
        }
        return;
    }
    out.push(Claim::Name(first.to_string()));
    for member in members {
        out.push(if is_snake(member) {
            Claim::Function(member.to_string())
        } else {
            Claim::Name(member.to_string())
        });
    }
}

/// Paths and CamelCase names inside the rest of a span, e.g. `(Push::Event(frame))`.
fn inner_claims(mut rest: &str, out: &mut Vec<Claim>) {
    while let Some(at) = rest.find(is_ident_start) {
        // Only identifiers that start here (not the tail of a number or of another word).
        let before = rest[..at].chars().next_back();
        let (path, after) = leading_path(&rest[at..]);
        if before.is_none_or(|c| !is_ident_char(c) && c != '.') {
            if path.contains("::") {
                path_claims(path, out);
            } else if is_camel(path) {
                out.push(Claim::Name(path.to_string()));
            }
        }
        rest = after;
    }
}

/// What one code span claims, if it names a file or looks like a Rust item.
fn claims_of(span: &str) -> Vec<Claim> {
    let mut out = Vec::new();
    if !span.contains(' ') && span.contains('/') && span.ends_with(".rs") {
        out.push(Claim::File(span.to_string()));
        return out;
    }
    let (head, rest) = leading_path(span);
    if head.contains("::") {
        path_claims(head, &mut out);
    } else if (is_camel(head)
        && (rest.is_empty() || rest.starts_with(['(', '<']) || rest.starts_with(" {")))
        || (is_snake(head) && rest.starts_with('('))
    {
        out.push(Claim::Name(head.to_string()));
    } else if is_snake(head) && head.contains('_') && rest.is_empty() {
        out.push(Claim::Name(head.to_string()));
        return out;
    } else {
        return out;
    }
    inner_claims(rest, &mut out);
    out
}

#[test]
fn claims_are_read_as_documented() {
    use Claim::*;
    let name = |s: &str| Name(s.to_string());
    let cases: Vec<(&str, Vec<Claim>)> = vec![
        ("src/stream.rs", vec![File("src/stream.rs".into())]),
        (
            "stream::websocket",
            vec![InModule {
                module: "stream".into(),
                item: "websocket".into(),
            }],
        ),
        (
            "Emitter::emit_now",
            vec![name("Emitter"), Function("emit_now".into())],
        ),
        ("Push::Close(SlowConsumer)", {
            vec![name("Push"), name("Close"), name("SlowConsumer")]
        }),
        ("Frame {seq, run_id, text}", vec![name("Frame")]),
        ("Recipient<Push>", vec![name("Recipient"), name("Push")]),
        (
            "try_send(Push::Event(frame.clone()))",
            vec![name("try_send"), name("Push"), name("Event")],
        ),
        ("emit_now", vec![name("emit_now")]),
        ("started", vec![]),
        ("GET /v1/ws", vec![]),
        ("--max-frame-bytes", vec![]),
        ("Last-Event-ID", vec![]),
        ("XADD", vec![]),
        ("{user, agent, input, thread_id}", vec![]),
        ("run.tool(\"calculator\", args)", vec![]),
    ];
    for (span, want) in cases {
        assert_eq!(claims_of(span), want, "{span:?}");
    }
    assert_eq!(
        code_spans("a `x` b\n```\n`not this`\n```\n`y\n z`"),
        ["x", "y z"]
    );
}

#[test]
fn architecture_md_names_what_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join(DOC)).expect("reading docs/architecture.md");
    let code = Code::load(root);
    let claims: BTreeSet<Claim> = code_spans(&doc)
        .iter()
        .flat_map(|span| claims_of(span))
        .collect();
    // Guard against a parser that finds nothing and so passes.
    let files = claims
        .iter()
        .filter(|c| matches!(c, Claim::File(_)))
        .count();
    assert!(
        files >= 10 && claims.len() >= 50,
        "only {files} files and {} claims found in {DOC}: is the parser broken?",
        claims.len()
    );
    let wrong: Vec<String> = claims.iter().filter_map(|c| code.check(root, c)).collect();
    assert!(
        wrong.is_empty(),
        "{DOC} names what the code does not have ({} of {} checked):\n{}",
        wrong.len(),
        claims.len(),
        wrong.join("\n")
    );
}
