//! What each field of a sensitive statement's log line becomes. Pure text
//! work on `sqllex`: no PostgreSQL call, nothing that can fail.
//!
//! Lines are told apart by `message_id`, the untranslated format string.
//! DETAIL, HINT and CONTEXT have no id; their rules hold in any language
//! and, where they recognize English text, only to keep more of it.

use manna_crypt_core::sqllex::{self, Options};

/// What a whole field is replaced with when nothing of it can be kept.
pub const FIELD_MARK: &str = "<redacted>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// `statement: %s`, `execute %s%s%s: %s`, the `duration: ... statement
    /// / parse / bind / execute` lines: the statement text ends the message.
    Statement,
    /// auto_explain: `duration: %.3f ms  plan:\n%s`, in any format.
    Plan,
    /// debug_print_parse/rewritten/plan: the title as message, the node
    /// tree (Const values included) as DETAIL.
    NodeDump,
    Other,
}

/// PostgreSQL's (postgres.c) lines that end with the statement text: the
/// simple protocol's, the extended protocol's execute (`%s` is `execute`
/// or `execute fetch from`), and their `duration:` forms.
const STATEMENT_IDS: &[&str] = &[
    "statement: %s",
    "%s %s%s%s: %s",
    "duration: %s ms  statement: %s",
    "duration: %s ms  parse %s: %s",
    "duration: %s ms  bind %s%s%s: %s",
    "duration: %s ms  %s %s%s%s: %s",
];
/// debug_print_*'s titles (`elog_node_display`: `errmsg_internal("%s:",
/// title)`).
const NODE_DUMP_TITLES: &[&str] = &["parse tree:", "rewritten parse tree:", "plan:"];

pub fn classify(message_id: &[u8], message: &[u8]) -> Line {
    let id = String::from_utf8_lossy(message_id);
    if id.starts_with("duration: ") && id.contains("plan:") {
        Line::Plan
    } else if STATEMENT_IDS.contains(&&*id) {
        Line::Statement
    } else if (id == "%s:" || id == "%s")
        && NODE_DUMP_TITLES.iter().any(|t| t.as_bytes() == message)
    {
        Line::NodeDump
    } else {
        Line::Other
    }
}

/// SQL text: literals and numbers replaced.
pub fn sql(text: &[u8], scs: bool) -> Vec<u8> {
    sqllex::redact(text, Options::sql(scs))
}

/// A statement line: the statement at its end is replaced by its redacted
/// form, the prefix (the duration, the prepared statement's name) kept. If
/// the message does not end with the statement, all of it is redacted.
pub fn statement_line(message: &[u8], original: &[u8], redacted: &[u8], scs: bool) -> Vec<u8> {
    match message.strip_suffix(original) {
        Some(prefix) if !original.is_empty() => [prefix, redacted].concat(),
        _ => sql(message, scs),
    }
}

/// An auto_explain plan: its first line (the duration) kept, then every
/// literal and number of the plan replaced, in text, JSON, YAML or XML
/// (where SQL sits inside double quotes).
pub fn plan(message: &[u8], scs: bool) -> Vec<u8> {
    let cut = message
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(message.len());
    let (head, body) = message.split_at(cut);
    [head, &sqllex::redact(body, Options::quoting(scs))].concat()
}

/// A message about a value (SQLSTATE classes 22 and 23: `invalid input
/// syntax for type integer: "..."`): double-quoted text, literals and
/// numbers replaced.
pub fn values(text: &[u8], scs: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.iter().position(|&b| b == b'"') {
        out.extend_from_slice(&rest[..open]);
        out.extend_from_slice(b"\"");
        out.extend_from_slice(FIELD_MARK.as_bytes());
        out.extend_from_slice(b"\"");
        let after = &rest[open + 1..];
        match after.iter().position(|&b| b == b'"') {
            Some(close) => rest = &after[close + 1..],
            None => rest = &[],
        }
    }
    out.extend_from_slice(rest);
    sqllex::redact(&out, Options::quoting(scs))
}

/// The DETAIL of an integrity violation (class 23): `Key (c)=(v) already
/// exists.` keeps the column list; `Failing row contains (...)` and the
/// rest keep what comes before the first parenthesis.
pub fn row_detail(text: &[u8]) -> Vec<u8> {
    let mark = [b"(", FIELD_MARK.as_bytes(), b")"].concat();
    let last = text.iter().rposition(|&b| b == b')');
    let key = text.windows(3).position(|w| w == b")=(");
    match (key, last) {
        (Some(k), Some(l)) if l >= k + 3 => [&text[..k + 2], &mark, &text[l + 1..]].concat(),
        _ => match (text.iter().position(|&b| b == b'('), last) {
            (Some(f), Some(l)) if l > f => [&text[..f], &mark, &text[l + 1..]].concat(),
            _ => FIELD_MARK.as_bytes().to_vec(),
        },
    }
}

/// Known CONTEXT lines that quote SQL: literals inside are found in
/// quoting mode. Any other line (COPY's raw input line, `JSON data, line
/// 1: ...`, a translation) keeps what precedes its first `: ` and loses
/// the rest; a line without `: ` is read in quoting mode.
const SQL_CONTEXTS: &[&str] = &[
    "SQL statement \"",
    "PL/pgSQL function ",
    "SQL function ",
    "extended query ",
    "unnamed portal ",
    "portal \"",
];

pub fn context(text: &[u8], scs: bool) -> Vec<u8> {
    let lines: Vec<Vec<u8>> = text
        .split(|&b| b == b'\n')
        .map(|line| {
            let known = SQL_CONTEXTS.iter().any(|p| line.starts_with(p.as_bytes()));
            let colon = line.windows(2).position(|w| w == b": ");
            match colon {
                Some(c) if !known => [&line[..c + 2], FIELD_MARK.as_bytes()].concat(),
                _ => sqllex::redact(line, Options::quoting(scs)),
            }
        })
        .collect();
    lines.join(&b'\n')
}

/// SQLSTATE class (its first two characters) of PostgreSQL's packed code.
pub fn class(sqlerrcode: i32) -> [u8; 2] {
    let ch = |shift: i32| (((sqlerrcode >> shift) & 0x3F) as u8).wrapping_add(b'0');
    [ch(0), ch(6)]
}
