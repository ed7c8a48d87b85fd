//! Tests of the SQL lexer: every literal form, the settings, names, and a
//! deterministic fuzz loop over mangled statements (no panic, every byte
//! covered, no secret byte run left in the output).

use super::*;

fn sql(text: &str) -> String {
    redact_str(text, Options::sql(true))
}

#[test]
fn string_forms() {
    let cases = [
        ("SELECT 'secret'", "SELECT '<redacted>'"),
        ("SELECT 'it''s'", "SELECT '<redacted>'"),
        ("SELECT E'a\\'b' || x", "SELECT '<redacted>' || x"),
        ("SELECT e'\\\\' , 'c'", "SELECT '<redacted>' , '<redacted>'"),
        (
            "SELECT U&'d\\0061t' UESCAPE '!'",
            "SELECT '<redacted>' UESCAPE '<redacted>'",
        ),
        (
            "SELECT B'1010', X'ff', N'nat'",
            "SELECT '<redacted>', '<redacted>', '<redacted>'",
        ),
        ("SELECT $$a'b$$", "SELECT '<redacted>'"),
        (
            "SELECT $t$ $$ ' $t$ || $u1$x$u1$",
            "SELECT '<redacted>' || '<redacted>'",
        ),
        ("SELECT '\\x00ff'::bytea", "SELECT '<redacted>'::bytea"),
        ("SELECT 'a'\n'b'", "SELECT '<redacted>'\n'<redacted>'"),
    ];
    for (input, want) in cases {
        assert_eq!(sql(input), want, "{input}");
    }
}

#[test]
fn standard_conforming_strings_both_readings() {
    // With it off, \' inside a plain literal does not end it; with it on,
    // the literal ends after the backslash. Either way nothing is left.
    let text = "SELECT 'a\\' secret', 1";
    assert_eq!(redact_str(text, Options::sql(false)), "SELECT '<redacted>'");
    assert_eq!(sql(text), "SELECT '<redacted>'");
    let text = "SELECT 'a\\' || 'SECRET' || x";
    assert!(!sql(text).contains("SECRET"));
    assert!(!redact_str(text, Options::sql(false)).contains("SECRET"));
    // Without a backslash, one reading.
    assert_eq!(sql("SELECT 'a', 'b'"), "SELECT '<redacted>', '<redacted>'");
}

#[test]
fn unterminated_runs_to_the_end() {
    assert_eq!(sql("SELECT 'secret"), "SELECT '<redacted>'");
    assert_eq!(sql("SELECT $q$secret"), "SELECT '<redacted>'");
    assert_eq!(sql("SELECT E'secret\\"), "SELECT '<redacted>'");
    assert_eq!(sql("SELECT /* x 'secret"), "SELECT /* x 'secret");
}

#[test]
fn identifiers_comments_params_numbers() {
    assert_eq!(
        sql("INSERT INTO \"we'ird\" (a$1, b) VALUES ($1, 42, -3.5e-2, .5) -- it's\n"),
        "INSERT INTO \"we'ird\" (a$1, b) VALUES ($1, <n>, -<n>, <n>) -- it's\n"
    );
    assert_eq!(sql("SELECT t1.c2 FROM t1"), "SELECT t1.c2 FROM t1");
    assert_eq!(
        sql("/* a /* 'x' */ 'y' */ 'z'"),
        "/* a /* 'x' */ 'y' */ '<redacted>'"
    );
    assert_eq!(sql("SELECT 0x1F, 1_000"), "SELECT <n>, <n>");
    let keep = Options {
        numbers: false,
        ..Options::sql(true)
    };
    assert_eq!(
        redact_str("LIMIT 10 OFFSET 'x'", keep),
        "LIMIT 10 OFFSET '<redacted>'"
    );
}

#[test]
fn quoting_mode_finds_literals_inside_double_quotes() {
    let plan = r#"{"Filter": "(c = 'secret'::text)", "Total Cost": 1.5}"#;
    let got = redact_str(plan, Options::quoting(true));
    assert!(!got.contains("secret"), "{got}");
    // As SQL, the same text is a quoted identifier and stays.
    assert!(sql(plan).contains("secret"));
    let ctx = "SQL statement \"INSERT INTO t VALUES ('secret')\"";
    assert_eq!(
        redact_str(ctx, Options::quoting(true)),
        "SQL statement \"INSERT INTO t VALUES ('<redacted>')\""
    );
}

#[test]
fn names_and_calls() {
    let text = b"insert into Public.\"Customers\" values (Manna_Crypt.encrypt_gcm ( 'x', 'k'))";
    let mut seen = Vec::new();
    assert!(!mentions(text, true, |n, called| {
        seen.push((String::from_utf8_lossy(n).into_owned(), called));
        false
    }));
    assert!(seen.contains(&("Customers".into(), false)));
    assert!(seen.contains(&("manna_crypt".into(), false)));
    assert!(seen.contains(&("encrypt_gcm".into(), true)));
    assert!(mentions(text, true, |n, _| n == b"manna_crypt"));
    // A name inside a comment is no name.
    assert!(!mentions(b"select 1 -- manna_crypt", true, |n, _| n == b"manna_crypt"));
    // Inside a DO block's body (a dollar-quoted string), a name counts.
    let watch = |n: &[u8], _: bool| n == b"manna_crypt";
    assert!(mentions(
        b"DO $$BEGIN PERFORM manna_crypt.x('s'); END$$",
        true,
        watch
    ));
    assert!(mentions(
        b"DO $f$ BEGIN EXECUTE 'select manna_crypt.x()'; END $f$",
        true,
        watch
    ));
    // A plain literal is a value: a word in it is no name.
    assert!(!mentions(
        b"DO 'BEGIN PERFORM manna_crypt.x(); END'",
        true,
        watch
    ));
    assert!(!mentions(b"SELECT 'manna_crypt'", true, watch));
    assert!(mentions(b"select info /*c*/ (1)", true, |n, c| n
        == b"info"
        && c));
    assert!(!mentions(b"select info from t", true, |n, c| n == b"info" && c));
}

/// A tiny deterministic generator (xorshift), so the fuzz loop needs no
/// dependency and fails the same way every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "'",
    "''",
    "\"",
    "$",
    "$$",
    "$a$",
    "$1",
    "E'",
    "e'",
    "U&'",
    "U&\"",
    "B'",
    "X'",
    "N'",
    "\\",
    "\\'",
    "--",
    "\n",
    "/*",
    "*/",
    "1",
    "1.5e+3",
    ".",
    "-",
    "é",
    "🔐",
    "\u{0}",
    "(",
    "SELECT ",
    "manna_crypt.encrypt_gcm(",
    "SECRETVALUE",
    " ",
    ",",
    ")",
    ";",
    "&",
];

#[test]
fn fuzz_never_panics_and_covers_every_byte() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..20_000 {
        let mut text = String::new();
        for _ in 0..rng.below(24) {
            text.push_str(PIECES[rng.below(PIECES.len())]);
        }
        let mut bytes = text.into_bytes();
        // Truncate anywhere, mid-character included, and flip a byte.
        bytes.truncate(rng.below(bytes.len() + 1));
        if !bytes.is_empty() && round % 3 == 0 {
            let i = rng.below(bytes.len());
            bytes[i] = rng.next() as u8;
        }
        for opts in [
            Options::sql(true),
            Options::sql(false),
            Options::quoting(true),
        ] {
            let tokens: Vec<Token> = Lexer::new(&bytes, opts).collect();
            let mut pos = 0;
            for t in &tokens {
                assert_eq!(t.start, pos, "gap in {bytes:?}");
                assert!(t.end > t.start && t.end <= bytes.len());
                pos = t.end;
            }
            assert_eq!(pos, bytes.len());
            let _ = redact(&bytes, opts);
            let _ = mentions(&bytes, opts.standard_conforming_strings, |_, _| false);
        }
    }
}

#[test]
fn fuzz_secret_in_a_literal_never_survives() {
    // A secret placed inside any string form, with random well-formed SQL
    // around it, is gone from the output in every setting.
    let forms: &[(&str, &str)] = &[
        ("'", "'"),
        ("E'", "'"),
        ("U&'", "'"),
        ("X'", "'"),
        ("$$", "$$"),
        ("$tag$", "$tag$"),
    ];
    let mut rng = Rng(42);
    for _ in 0..5_000 {
        let (open, close) = forms[rng.below(forms.len())];
        let mut text = String::new();
        for _ in 0..rng.below(6) {
            text.push_str(
                ["SELECT ", "x, ", "\"q\"\"d\" ", "-- c\n", "/* c */", "$1 "][rng.below(6)],
            );
        }
        text.push_str(open);
        text.push_str("S3CRET");
        text.push_str(close);
        if rng.below(2) == 0 {
            text.truncate(text.len() - close.len());
        }
        for scs in [true, false] {
            let out = redact_str(&text, Options::sql(scs));
            assert!(!out.contains("S3CRET"), "{text:?} -> {out:?}");
        }
    }
}
