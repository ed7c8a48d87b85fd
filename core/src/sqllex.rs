//! A lexer for SQL text that cannot fail: it finds string literals, numeric
//! constants, identifiers and comments in any bytes, well-formed or not, so
//! the server-log redaction (`manna_crypt.redact_log`) can replace the
//! literals of a statement while PostgreSQL reports an error in it.
//!
//! Why not PostgreSQL's own scanner: `core_yylex` raises an ERROR on bad
//! input (an unterminated quote, a bad escape), and an error raised inside
//! `emit_log_hook` while another error is being reported cannot be caught
//! safely; its token codes live in a header the packaged 16/18 builds do not
//! ship. Why not a regular expression: a quote inside a dollar quote, an
//! `E'\''` escape or a comment is exactly where one goes wrong.
//!
//! The rules follow PostgreSQL's `scan.l` closely enough that every literal
//! PostgreSQL would read as a literal is found here too; where the two could
//! differ (an unterminated literal, a broken escape), this side takes more,
//! never less: an unterminated literal or comment runs to the end of the
//! text. Works on bytes: every delimiter is ASCII and every byte of a
//! multibyte UTF-8 character is >= 0x80, so cuts never split a character.

/// What replaces a string literal (any form: `'...'`, `E'...'`, `U&'...'`,
/// `B'...'`, `X'...'`, `N'...'`, `$tag$...$tag$`). Itself a string literal,
/// so the statement keeps its shape and still reads as SQL.
pub const STRING_MARK: &str = "'<redacted>'";

/// What replaces a numeric constant (an SSN or a card number can be typed
/// as a number). Not a number itself, so nobody mistakes it for the value.
pub const NUMBER_MARK: &str = "<n>";

/// How to read the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// PostgreSQL's `standard_conforming_strings`: off means a backslash
    /// escapes the next character in a plain `'...'` too.
    pub standard_conforming_strings: bool,
    /// Replace numeric constants as well as strings.
    pub numbers: bool,
    /// `"..."` is a quoted identifier (SQL). Off for text that is not SQL
    /// but quotes SQL (a JSON or YAML plan, an error CONTEXT line): there a
    /// double quote delimits the quoted SQL, and the literals inside it
    /// must still be found.
    pub quoted_identifiers: bool,
}

impl Options {
    /// SQL statement text.
    pub fn sql(standard_conforming_strings: bool) -> Self {
        Options {
            standard_conforming_strings,
            numbers: true,
            quoted_identifiers: true,
        }
    }

    /// Text that quotes SQL inside double quotes (plans, CONTEXT lines).
    pub fn quoting(standard_conforming_strings: bool) -> Self {
        Options {
            quoted_identifiers: false,
            ..Options::sql(standard_conforming_strings)
        }
    }
}

/// One token's kind; its bytes are `text[start..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string literal of any form, prefix included.
    String,
    Number,
    /// An unquoted identifier or key word.
    Word,
    /// A `"quoted identifier"` (or `U&"..."`).
    QuotedWord,
    /// `$1`: a bind parameter reference.
    Param,
    Comment,
    /// Anything else: white space, operators, punctuation.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

fn ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn ident_cont(b: u8) -> bool {
    ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// The tokens of `text`, in order, covering every byte exactly once.
pub struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
    opts: Options,
}

impl<'a> Lexer<'a> {
    pub fn new(text: &'a [u8], opts: Options) -> Self {
        Lexer { text, pos: 0, opts }
    }

    fn at(&self, i: usize) -> Option<u8> {
        self.text.get(i).copied()
    }

    /// The end of a `'...'` body starting after the opening quote at `i`:
    /// the index after the closing quote, or the text's end.
    fn quoted_end(&self, mut i: usize, backslashes: bool) -> usize {
        while let Some(b) = self.at(i) {
            match b {
                b'\\' if backslashes => i += 2,
                b'\'' if self.at(i + 1) == Some(b'\'') => i += 2,
                b'\'' => return i + 1,
                _ => i += 1,
            }
        }
        self.text.len()
    }

    /// `"..."` with `""` doubling, from the opening quote at `i`.
    fn ident_end(&self, mut i: usize) -> usize {
        i += 1;
        while let Some(b) = self.at(i) {
            if b == b'"' {
                if self.at(i + 1) == Some(b'"') {
                    i += 2;
                    continue;
                }
                return i + 1;
            }
            i += 1;
        }
        self.text.len()
    }

    /// A dollar quote's opening tag at `i` (`$$` or `$tag$`): its length.
    fn dollar_tag(&self, i: usize) -> Option<usize> {
        let mut j = i + 1;
        match self.at(j) {
            Some(b'$') => return Some(2),
            Some(b) if ident_start(b) => j += 1,
            _ => return None,
        }
        while let Some(b) = self.at(j) {
            if b == b'$' {
                return Some(j + 1 - i);
            }
            if !(ident_start(b) || b.is_ascii_digit()) {
                return None;
            }
            j += 1;
        }
        None
    }

    fn dollar_end(&self, i: usize, tag_len: usize) -> usize {
        let tag = &self.text[i..i + tag_len];
        let body = i + tag_len;
        self.text[body..]
            .windows(tag_len)
            .position(|w| w == tag)
            .map_or(self.text.len(), |p| body + p + tag_len)
    }

    fn block_comment_end(&self, mut i: usize) -> usize {
        let mut depth = 0usize;
        while i < self.text.len() {
            if self.at(i) == Some(b'/') && self.at(i + 1) == Some(b'*') {
                depth += 1;
                i += 2;
            } else if self.at(i) == Some(b'*') && self.at(i + 1) == Some(b'/') {
                depth = depth.saturating_sub(1);
                i += 2;
                if depth == 0 {
                    return i;
                }
            } else {
                i += 1;
            }
        }
        self.text.len()
    }

    fn number_end(&self, mut i: usize) -> usize {
        while let Some(b) = self.at(i) {
            let exp_sign = (b == b'+' || b == b'-')
                && matches!(self.at(i.wrapping_sub(1)), Some(b'e' | b'E'))
                && self.at(i + 1).is_some_and(|d| d.is_ascii_digit());
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || exp_sign {
                i += 1;
            } else {
                break;
            }
        }
        i
    }

    /// A word at `i` that prefixes a string (`E'`, `B'`, `X'`, `N'`,
    /// `U&'`): the index of the opening quote and whether backslashes
    /// escape inside.
    fn prefixed_string(&self, i: usize, word_end: usize) -> Option<(usize, bool)> {
        let word = &self.text[i..word_end];
        let quote = |q: usize| self.at(q) == Some(b'\'');
        match word {
            [b'e' | b'E'] if quote(word_end) => Some((word_end, true)),
            [b'b' | b'B' | b'x' | b'X' | b'n' | b'N'] if quote(word_end) => {
                Some((word_end, !self.opts.standard_conforming_strings))
            }
            [b'u' | b'U'] if self.at(word_end) == Some(b'&') && quote(word_end + 1) => {
                Some((word_end + 1, false))
            }
            _ => None,
        }
    }

    fn next_token(&mut self) -> Option<Token> {
        let i = self.pos;
        let b = self.at(i)?;
        let prev_ident = i > 0 && ident_cont(self.text[i - 1]);
        let (kind, end) = match b {
            b'\'' => {
                let bs = !self.opts.standard_conforming_strings;
                (Kind::String, self.quoted_end(i + 1, bs))
            }
            b'"' if self.opts.quoted_identifiers => (Kind::QuotedWord, self.ident_end(i)),
            b'-' if self.at(i + 1) == Some(b'-') => {
                let nl = self.text[i..].iter().position(|&c| c == b'\n');
                (Kind::Comment, nl.map_or(self.text.len(), |p| i + p))
            }
            b'/' if self.at(i + 1) == Some(b'*') => (Kind::Comment, self.block_comment_end(i)),
            b'$' if !prev_ident => match self.dollar_tag(i) {
                Some(len) => (Kind::String, self.dollar_end(i, len)),
                None => {
                    let digits = self.text[i + 1..].iter().take_while(|c| c.is_ascii_digit());
                    (Kind::Param, i + 1 + digits.count())
                }
            },
            b'0'..=b'9' if !prev_ident => (Kind::Number, self.number_end(i)),
            b'.' if !prev_ident && self.at(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                (Kind::Number, self.number_end(i + 1))
            }
            _ if ident_start(b) => {
                let len = self.text[i..]
                    .iter()
                    .take_while(|&&c| ident_cont(c))
                    .count();
                let word_end = i + len;
                match self.prefixed_string(i, word_end) {
                    Some((q, bs)) => (Kind::String, self.quoted_end(q + 1, bs)),
                    None if self.at(word_end) == Some(b'&')
                        && self.at(word_end + 1) == Some(b'"')
                        && self.opts.quoted_identifiers
                        && len == 1 =>
                    {
                        (Kind::QuotedWord, self.ident_end(word_end + 1))
                    }
                    None => (Kind::Word, word_end),
                }
            }
            _ => (Kind::Other, i + 1),
        };
        // Every arm moves forward by at least one byte and stays in bounds.
        let end = end.clamp(i + 1, self.text.len());
        self.pos = end;
        Some(Token {
            kind,
            start: i,
            end,
        })
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        self.next_token()
    }
}

/// The byte ranges [`redact`] replaces, and whether each holds a string.
fn spans(text: &[u8], opts: Options) -> impl Iterator<Item = (usize, usize, bool)> + '_ {
    Lexer::new(text, opts).filter_map(move |t| match t.kind {
        Kind::String => Some((t.start, t.end, true)),
        Kind::Number if opts.numbers => Some((t.start, t.end, false)),
        _ => None,
    })
}

/// `text` with every string literal (and, with `opts.numbers`, every numeric
/// constant) replaced by a marker; everything else as it was.
///
/// When the text holds a backslash, it is read both with and without
/// `standard_conforming_strings`, and whatever is a literal in either
/// reading is replaced: a client that assumed the other setting sends a
/// statement the server rejects, and that statement is logged too.
pub fn redact(text: &[u8], opts: Options) -> Vec<u8> {
    let mut all: Vec<(usize, usize, bool)> = spans(text, opts).collect();
    if text.contains(&b'\\') {
        let other = Options {
            standard_conforming_strings: !opts.standard_conforming_strings,
            ..opts
        };
        all.extend(spans(text, other));
        all.sort_unstable();
    }
    let mut out = Vec::with_capacity(text.len() + 16);
    let mut pos = 0;
    let mut i = 0;
    while i < all.len() {
        let (start, mut end, mut string) = all[i];
        i += 1;
        // Overlapping ranges (the two readings) become one.
        while i < all.len() && all[i].0 < end {
            end = end.max(all[i].1);
            string |= all[i].2;
            i += 1;
        }
        if start >= pos {
            out.extend_from_slice(&text[pos..start]);
        }
        out.extend_from_slice(if string { STRING_MARK } else { NUMBER_MARK }.as_bytes());
        pos = pos.max(end);
    }
    out.extend_from_slice(&text[pos.min(text.len())..]);
    out
}

/// [`redact`] on a `str` (its output is valid UTF-8 again: only whole
/// tokens cut at ASCII bytes are replaced).
pub fn redact_str(text: &str, opts: Options) -> String {
    String::from_utf8_lossy(&redact(text.as_bytes(), opts)).into_owned()
}

/// A name as SQL means it: an unquoted word folded to lower case (ASCII,
/// as PostgreSQL folds identifiers in a UTF-8 database), a quoted one as
/// written with `""` undoubled.
pub fn name_of(text: &[u8], t: Token) -> Option<Vec<u8>> {
    let raw = &text[t.start..t.end];
    match t.kind {
        Kind::Word => Some(raw.to_ascii_lowercase()),
        Kind::QuotedWord => {
            let open = raw.iter().position(|&b| b == b'"')?;
            let inner = &raw[open + 1..];
            let inner = inner.strip_suffix(b"\"").unwrap_or(inner);
            let mut name = Vec::with_capacity(inner.len());
            let mut i = 0;
            while i < inner.len() {
                name.push(inner[i]);
                i += if inner[i] == b'"' && inner.get(i + 1) == Some(&b'"') {
                    2
                } else {
                    1
                };
            }
            Some(name)
        }
        _ => None,
    }
}

/// Whether `text` names something `watched` cares about: `watched(name,
/// called)` is asked for every identifier, `called` telling whether a `(`
/// follows it (past white space and comments), as after a function's name.
///
/// The bodies of dollar-quoted literals are read as SQL too (a `DO` block
/// or a function body) and so are the literals inside them (dynamic SQL),
/// a few levels deep: a name in one then counts, which errs towards
/// redacting. A plain `'...'` literal of the statement itself is a value,
/// and a word in it (`'updated items'`) is not a name.
pub fn mentions(text: &[u8], scs: bool, watched: impl FnMut(&[u8], bool) -> bool) -> bool {
    mentions_in(text, Options::sql(scs), watched)
}

/// [`mentions`] in text read with `opts` (a plan, where SQL sits inside
/// double quotes, is read with [`Options::quoting`]).
pub fn mentions_in(
    text: &[u8],
    opts: Options,
    mut watched: impl FnMut(&[u8], bool) -> bool,
) -> bool {
    mentions_at(text, opts, &mut watched, 0)
}

const BODY_DEPTH: usize = 3;

fn mentions_at(
    text: &[u8],
    opts: Options,
    watched: &mut dyn FnMut(&[u8], bool) -> bool,
    depth: usize,
) -> bool {
    let tokens: Vec<Token> = Lexer::new(text, opts).collect();
    let scs = opts.standard_conforming_strings;
    tokens.iter().enumerate().any(|(n, &t)| {
        if t.kind == Kind::String {
            let literal = &text[t.start..t.end];
            // Dynamic SQL inside a body is a plain literal there.
            return (literal.first() == Some(&b'$') || depth > 0)
                && depth < BODY_DEPTH
                && mentions_at(body(literal), Options::sql(scs), watched, depth + 1);
        }
        let Some(name) = name_of(text, t) else {
            return false;
        };
        let called = tokens[n + 1..]
            .iter()
            .find(|u| {
                !(u.kind == Kind::Comment
                    || (u.kind == Kind::Other && text[u.start].is_ascii_whitespace()))
            })
            .is_some_and(|u| text[u.start] == b'(');
        watched(&name, called)
    })
}

/// A literal's contents, roughly: past the opening tag or quote (and its
/// prefix) and before the closing one (if unterminated, a little of the
/// end is not read; nothing is read past the text).
fn body(literal: &[u8]) -> &[u8] {
    let dollar = literal.first() == Some(&b'$');
    let open = if dollar {
        literal
            .iter()
            .skip(1)
            .position(|&b| b == b'$')
            .map(|p| p + 2)
    } else {
        literal.iter().position(|&b| b == b'\'').map(|p| p + 1)
    };
    let open = open.unwrap_or(literal.len()).min(literal.len());
    let close = if dollar { open } else { 1 };
    let inner = &literal[open..];
    &inner[..inner.len().saturating_sub(close)]
}

#[cfg(test)]
#[path = "sqllex_tests.rs"]
mod tests;
