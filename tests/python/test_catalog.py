"""The extension's catalog contract: every object documented, PUBLIC gets
nothing that touches keys, volatility declared as the README says."""

# The format checks (the domain's CHECK runs as whoever writes), and the two
# per-row functions of a re-encryption batch, which runs as the table's owner
# and which refuse to work outside the batch that issued them.
PUBLIC_FUNCTIONS = {"is_encrypted", "key_id", "_reencrypt_row", "_reencrypt_value"}


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
    secdef = conn.execute(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'manna_crypt'::regnamespace AND prosecdef"
    ).fetchone()[0]
    assert secdef == 0
