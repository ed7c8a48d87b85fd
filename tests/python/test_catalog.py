"""The extension's catalog contract: every object documented, PUBLIC gets
nothing that touches keys, volatility declared as the README says."""

import re

# The format checks (the domain's CHECK runs as whoever writes), and the two
# per-row functions of a re-encryption batch, which runs as the table's owner
# and which refuse to work outside the batch that issued them.
# The format checks; the per-row re-encryption functions (token-guarded);
# the protect trigger (39P01 when called) and its CHECK (a format check),
# which every writer of a protected table runs.
PUBLIC_FUNCTIONS = {
    "is_encrypted",
    "key_id",
    "_reencrypt_row",
    "_reencrypt_value",
    "_protect",
    "_protected_check",
    # No key involved: a normalization, and what pg_trigger shows anyone.
    "blind_normalize",
    "protected_columns",
}


def members(conn, classid):
    return conn.execute(
        """SELECT d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
            WHERE e.extname = 'manna_crypt' AND d.deptype = 'e' AND d.classid = %s::regclass""",
        (classid,),
    ).fetchall()


def test_every_object_has_a_comment(conn):
    missing = conn.execute(
        """SELECT pg_describe_object(d.classid, d.objid, 0)
             FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
            WHERE e.extname = 'manna_crypt' AND d.deptype = 'e'
              AND d.classid IN ('pg_proc'::regclass, 'pg_class'::regclass, 'pg_type'::regclass)
              AND NOT (d.classid = 'pg_class'::regclass
                       AND (SELECT relkind FROM pg_class WHERE oid = d.objid) IN ('S', 'i'))
              AND NOT (d.classid = 'pg_type'::regclass
                       AND (SELECT typtype FROM pg_type WHERE oid = d.objid) <> 'd')
              AND obj_description(d.objid, d.classid::regclass::name) IS NULL
            ORDER BY 1"""
    ).fetchall()
    assert missing == []


def test_public_executes_only_the_format_checks(conn):
    public = conn.execute(
        """SELECT DISTINCT p.proname FROM pg_proc p
             JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'manna_crypt'
            WHERE has_function_privilege('public', p.oid, 'EXECUTE')"""
    ).fetchall()
    assert {r[0] for r in public} == PUBLIC_FUNCTIONS


def test_public_reads_no_table(conn):
    readable = conn.execute(
        """SELECT c.relname FROM pg_class c
             JOIN pg_depend d ON d.objid = c.oid AND d.classid = 'pg_class'::regclass AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'manna_crypt'
            WHERE c.relkind IN ('r', 'v') AND has_table_privilege('public', c.oid, 'SELECT')"""
    ).fetchall()
    assert readable == []


def test_volatility_is_declared_on_purpose(conn):
    vol = dict(
        conn.execute(
            """SELECT p.oid::regprocedure::text, p.provolatile FROM pg_proc p
                WHERE p.pronamespace = 'manna_crypt'::regnamespace
                  AND p.proname IN ('encrypt_gcm', 'decrypt_gcm', 'aes_gcm_decrypt', 'is_encrypted')"""
        ).fetchall()
    )
    expected = {
        # a random nonce per call
        "manna_crypt.encrypt_gcm(text,text,text)": "v",
        "manna_crypt.encrypt_gcm(text,bytea,text)": "v",
        "manna_crypt.encrypt_gcm(bytea,text,text)": "v",
        "manna_crypt.encrypt_gcm(bytea,bytea,text)": "v",
        # raw key: the result depends on the arguments only
        "manna_crypt.decrypt_gcm(text,bytea,text)": "i",
        "manna_crypt.decrypt_gcm(bytea,bytea,text)": "i",
        "manna_crypt.aes_gcm_decrypt(bytea,bytea,bytea,bytea)": "i",
        "manna_crypt.is_encrypted(text)": "i",
        # keyring: reads key state that a revocation changes
        "manna_crypt.decrypt_gcm(text,text)": "s",
        "manna_crypt.decrypt_gcm(bytea,text)": "s",
    }
    assert vol == expected
    # One SECURITY DEFINER function, on purpose: the sql_drop event trigger
    # must delete from the registry, which the dropping role cannot write
    # (sql/reencrypt.sql argues why it is safe). Nothing else switches
    # rights by declaration: the Rust functions switch internally.
    secdef = conn.execute(
        """SELECT oid::regprocedure::text FROM pg_proc
            WHERE pronamespace = 'manna_crypt'::regnamespace AND prosecdef"""
    ).fetchall()
    assert [r[0] for r in secdef] == ["manna_crypt._forget_dropped()"]


# ---------------------------------------------------------------------------
# search_path: no routine finds another role's object by an unqualified name
# (tests/python/test_search_path.py shows the attack).
# ---------------------------------------------------------------------------

FIXED_PATH = "search_path=pg_catalog, pg_temp"
# Procedures that commit (directly or through a CALL) cannot carry a SET
# clause: their bodies are checked for qualification instead.
COMMITTING_PROCEDURES = {
    "manna_crypt._reencrypt_run(text,regclass,name,text,text,integer,name,boolean,bigint,boolean)",
    "manna_crypt.migrate_fernet(regclass,name,text,text,integer,name,boolean,bigint,boolean)",
    "manna_crypt.rewrap_column(regclass,name,text,integer,name,boolean,bigint,boolean)",
    "manna_crypt.encrypt_column(regclass,name,text,integer,name,boolean,bigint,boolean)",
    "manna_crypt.backfill_blind_index(regclass,name,integer,boolean,bigint,boolean)",
}
# C (Rust) functions with a SET clause. None: a SET clause costs every call
# (no inlining, a GUC save and restore), so the Rust functions set what they
# need internally. A deliberate exception is listed here.
C_FUNCTIONS_WITH_SET = set()

QUALIFIERS = ("pg_catalog", "manna_crypt")
# Words that may stand before "(" in a PL/pgSQL body without being a call.
NOT_CALLS = {"if", "elsif", "while", "and", "or", "not", "in", "return", "perform", "when", "then", "else", "loop"}
# Statements that would read or write relations by name, or run SQL built at
# run time: none belongs in a committing procedure, whose work is in C.
NO_RELATION_WORDS = {"select", "from", "join", "into", "update", "insert", "delete", "merge", "execute", "table", "copy"}

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_QNAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT})*"


def _strip(src):
    """The body without comments and with every string literal emptied."""
    out, i = [], 0
    while i < len(src):
        if src.startswith("--", i):
            j = src.find("\n", i)
            i = len(src) if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = len(src) if j < 0 else j + 2
        elif src[i] == "'":
            j = i + 1
            while j < len(src):
                if src[j] == "'" and src.startswith("''", j):
                    j += 2
                elif src[j] == "'":
                    break
                else:
                    j += 1
            out.append("''")
            i = j + 1
        elif src[i] == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", src[i:])):
            tag = m.group(0)
            j = src.find(tag, i + len(tag))
            out.append("''")
            i = len(src) if j < 0 else j + len(tag)
        else:
            out.append(src[i])
            i += 1
    return "".join(out)


def _qualified(qname):
    parts = [p.strip() for p in qname.split(".")]
    return len(parts) >= 2 and parts[0].strip('"') in QUALIFIERS


def unqualified_uses(src):
    """What in a PL/pgSQL body could resolve through the caller's
    search_path: calls, casts, declared types and operators not qualified
    with pg_catalog or manna_crypt, and statements naming relations."""
    body = _strip(src)
    problems = []
    # OPERATOR(pg_catalog.op) is the qualified form of an operator
    for m in re.finditer(r"\bOPERATOR\s*\(([^)]*)\)", body, re.I):
        if not re.fullmatch(r"\s*pg_catalog\s*\.\s*[-+*/<>=~!@#%^&|`?]+\s*", m.group(1)):
            problems.append(f"operator {m.group(0)}")
    body = re.sub(r"\bOPERATOR\s*\([^)]*\)", " ", body, flags=re.I)
    for m in re.finditer(rf"({_QNAME})\s*\(", body):
        name = m.group(1)
        if not _qualified(name) and name.lower() not in NOT_CALLS:
            problems.append(f"call {name}(")
    for m in re.finditer(rf"::\s*({_QNAME})", body):
        if not _qualified(m.group(1)):
            problems.append(f"cast ::{m.group(1)}")
    for block in re.finditer(r"\bDECLARE\b(.*?)\bBEGIN\b", body, re.I | re.S):
        for decl in block.group(1).split(";"):
            m = re.match(rf"\s*{_IDENT}\s+(?:CONSTANT\s+)?({_QNAME})", decl, re.I)
            if m and m.group(1).lower() != "alias" and not _qualified(m.group(1)):
                problems.append(f"declared type {m.group(1)}")
    rest = re.sub(r"::|:=|=>", " ", body)
    for m in re.finditer(r"[-+*/<>=~!@#%^&|`?]+", rest):
        problems.append(f"operator {m.group(0)}")
    for word in re.findall(r"[A-Za-z_]+", body):
        if word.lower() in NO_RELATION_WORDS:
            problems.append(f"statement word {word}")
    return problems


def test_the_qualification_check_finds_what_it_should():
    assert unqualified_uses("BEGIN PERFORM manna_crypt.f(a OPERATOR(pg_catalog.=) b); COMMIT; END") == []
    assert unqualified_uses("DECLARE h pg_catalog.int8; BEGIN h := pg_catalog.abs(-h::pg_catalog.int8); END") == [
        "operator -"
    ]
    bad = (
        "DECLARE h bigint; n numeric := 1; BEGIN h := f(1); -- g(2)\n"
        "IF h = 2 THEN PERFORM pg_catalog.upper('x(' || h::text); END IF;\n"
        "SELECT 1 INTO h FROM t; PERFORM a OPERATOR(public.=) b; END"
    )
    assert sorted(unqualified_uses(bad)) == sorted(
        [
            "operator OPERATOR(public.=)",
            "call f(",
            "cast ::text",
            "declared type bigint",
            "declared type numeric",
            "operator =",
            "operator ||",
            "statement word SELECT",
            "statement word INTO",
            "statement word FROM",
        ]
    )


def extension_routines(conn):
    return conn.execute(
        """SELECT p.oid::regprocedure::text, p.prokind, l.lanname, p.proconfig, p.prosrc
             FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
             JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'manna_crypt'
            ORDER BY 1"""
    ).fetchall()


def committing_procedures(routines):
    """Procedures whose body commits or rolls back, or CALLs one that does."""
    procs = {sig: _strip(src) for sig, kind, lang, _, src in routines if kind == "p" and lang == "plpgsql"}
    found = {sig for sig, body in procs.items() if re.search(r"\b(COMMIT|ROLLBACK)\b", body, re.I)}
    while True:
        names = {sig.split("(")[0] for sig in found}
        more = {
            sig
            for sig, body in procs.items()
            if sig not in found
            and any(re.search(rf"\bCALL\s+{re.escape(n)}\s*\(", body, re.I) for n in names)
        }
        if not more:
            return found
        found |= more


def test_sql_routines_have_a_fixed_search_path(conn):
    routines = extension_routines(conn)
    committing = committing_procedures(routines)
    assert committing == COMMITTING_PROCEDURES
    missing = [
        sig
        for sig, _, lang, config, _ in routines
        if lang in ("sql", "plpgsql") and sig not in committing and FIXED_PATH not in (config or [])
    ]
    assert missing == []


def test_committing_procedures_are_fully_qualified(conn):
    routines = extension_routines(conn)
    problems = {}
    for sig, _, _, config, src in routines:
        if sig in COMMITTING_PROCEDURES:
            assert config is None, f"{sig} has a SET clause: it could not COMMIT"
            if found := unqualified_uses(src):
                problems[sig] = found
    assert problems == {}


def test_c_functions_have_no_set_clause(conn):
    with_set = {sig for sig, _, lang, config, _ in extension_routines(conn) if lang == "c" and config}
    assert with_set == C_FUNCTIONS_WITH_SET
