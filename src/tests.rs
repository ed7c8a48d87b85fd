// Backend tests (`cargo pgrx test pg15`): behaviour inside a real backend,
// through SPI and through the Rust entry points. The SQL contract with its
// pinned output lives in tests/pg_regress; client-side behaviour in
// tests/python. Each #[pg_test] runs in its own transaction, rolled back
// afterwards, so keyrings created here do not outlive the test (key ids,
// which come from a sequence, do advance).
//
// The pg_test cluster's root key comes from `manna_crypt.root_key_command`
// (see `pg_test::postgresql_conf_options` in src/lib.rs).

use pgrx::prelude::*;

const KEY_HEX: &str = "8f2b6a4c0d1e3f5a7b9c1d2e3f405162738495a6b7c8d9eafb0c1d2e3f405162";

fn key_sql() -> String {
    format!("decode('{KEY_HEX}', 'hex')")
}

fn one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(query: &str) -> Option<T> {
    Spi::get_one::<T>(query).expect("query failed")
}

/// The SQLSTATE a statement fails with ("ok" if it succeeds), caught in a
/// PL/pgSQL subtransaction so the test's transaction stays usable.
fn sqlstate_of(query: &str) -> String {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text \
         LANGUAGE plpgsql AS $f$ \
         BEGIN EXECUTE q; RETURN 'ok'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $f$",
    )
    .expect("helper");
    Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[query.into()])
        .expect("helper call")
        .expect("non-null sqlstate")
}

#[pg_test]
fn raw_key_text_round_trip() {
    let k = key_sql();
    let got = one::<String>(&format!(
        "SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('héllo 🔐', {k}, 'aad'), {k}, 'aad')"
    ));
    assert_eq!(got.as_deref(), Some("héllo 🔐"));
    let empty = one::<String>(&format!(
        "SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('', {k}), {k})"
    ));
    assert_eq!(empty.as_deref(), Some(""));
}

#[pg_test]
fn raw_key_bytea_round_trip_and_layout() {
    let k = key_sql();
    let env = one::<Vec<u8>>(&format!(
        "SELECT manna_crypt.encrypt_gcm('\\x00ff7f'::bytea, {k})"
    ))
    .expect("envelope");
    assert_eq!(env.len(), 1 + 4 + 12 + 3 + 16);
    assert_eq!(&env[..5], &[1, 0, 0, 0, 0]);
    let back = Spi::get_one_with_args::<Vec<u8>>(
        &format!("SELECT manna_crypt.decrypt_gcm($1, {k})"),
        &[env.as_slice().into()],
    )
    .expect("query");
    assert_eq!(back.as_deref(), Some(&[0x00u8, 0xff, 0x7f][..]));
}

#[pg_test]
fn text_form_is_prefix_and_base64_of_the_envelope() {
    let k = key_sql();
    let ok = one::<bool>(&format!(
        "WITH c AS (SELECT manna_crypt.encrypt_gcm('abc', {k}, 'x') AS c) \
         SELECT left(c, 4) = 'mc1:' \
            AND manna_crypt.decrypt_gcm(decode(substr(c, 5), 'base64'), {k}, 'x') = 'abc'::bytea \
         FROM c"
    ));
    assert_eq!(ok, Some(true));
}

#[pg_test]
fn rust_seal_and_open_agree_with_sql() {
    let key = hex::decode(KEY_HEX).expect("hex");
    use crate::crypto::{seal_value, Form, KeySource};
    let env = seal_value(KeySource::Raw(&key), Form::Bytes, b"from rust", b"ctx")
        .unwrap_or_else(|_| panic!("seal failed"));
    let text = Spi::get_one_with_args::<String>(
        &format!(
            "SELECT convert_from(manna_crypt.decrypt_gcm($1, {}, 'ctx'), 'UTF8')",
            key_sql()
        ),
        &[env.as_slice().into()],
    )
    .expect("query");
    assert_eq!(text.as_deref(), Some("from rust"));
    let opened = crate::crypto::open_value(Some(&key), &env, b"ctx");
    let opened = opened.unwrap_or_else(|_| panic!("open failed"));
    assert_eq!(&opened[..], b"from rust");
    assert!(crate::crypto::open_value(Some(&key), &env, b"other").is_err());
}

#[pg_test]
fn nulls_give_null_and_null_aad_is_empty_aad() {
    let k = key_sql();
    let all = one::<bool>(&format!(
        "SELECT manna_crypt.encrypt_gcm(NULL::text, {k}) IS NULL \
            AND manna_crypt.encrypt_gcm(NULL::bytea, {k}) IS NULL \
            AND manna_crypt.decrypt_gcm(NULL::text, {k}) IS NULL \
            AND manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('v', {k}, NULL), {k}, '') = 'v' \
            AND manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('v', {k}, ''), {k}) = 'v'"
    ));
    assert_eq!(all, Some(true));
}

#[pg_test(error = "key must not be null")]
fn null_key_is_an_error() {
    Spi::run("SELECT manna_crypt.encrypt_gcm('secret', NULL::bytea)").expect("raises");
}

/// The domain's CHECK (23514, PostgreSQL's check_violation) keeps
/// plaintext out of an `encrypted_text` column.
#[pg_test]
fn domain_rejects_plaintext() {
    Spi::run("CREATE TEMP TABLE t (c manna_crypt.encrypted_text)").expect("create");
    assert_eq!(sqlstate_of("INSERT INTO t VALUES ('a plaintext token')"), "23514");
    assert_eq!(one::<i64>("SELECT count(*) FROM t"), Some(0));
}

#[pg_test]
fn domain_accepts_ciphertexts() {
    let k = key_sql();
    Spi::run("CREATE TEMP TABLE t (c manna_crypt.encrypted_text)").expect("create");
    Spi::run(&format!(
        "INSERT INTO t SELECT manna_crypt.encrypt_gcm('v' || i, {k}) FROM generate_series(1, 100) i"
    ))
    .expect("insert");
    let n = one::<i64>(&format!(
        "SELECT count(*) FROM t WHERE manna_crypt.decrypt_gcm(c, {k}) LIKE 'v%'"
    ));
    assert_eq!(n, Some(100));
}

#[pg_test]
fn errors_carry_their_sqlstates() {
    let k = key_sql();
    assert_eq!(
        sqlstate_of(&format!("SELECT manna_crypt.decrypt_gcm('plain', {k})")),
        "22P02"
    );
    assert_eq!(
        sqlstate_of(&format!("SELECT manna_crypt.decrypt_gcm('mc1:!!', {k})")),
        "22P02"
    );
    assert_eq!(
        sqlstate_of("SELECT manna_crypt.encrypt_gcm('x', decode(repeat('00', 16), 'hex'))"),
        "22023"
    );
    assert_eq!(
        sqlstate_of(&format!(
            "SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('x', {k}, 'a'), {k}, 'b')"
        )),
        "39000"
    );
    assert_eq!(
        sqlstate_of(&format!(
            "SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('x', {k}), \
             decode(repeat('00', 32), 'hex'))"
        )),
        "39000"
    );
    assert_eq!(
        sqlstate_of(&format!(
            "SELECT manna_crypt.decrypt_gcm('mc1:' || \
             encode(manna_crypt.encrypt_gcm('\\xff'::bytea, {k}), 'base64'), {k})"
        )),
        "22021"
    );
    assert_eq!(
        sqlstate_of("SELECT manna_crypt.encrypt_gcm('x', 'pgt_no_such_ring')"),
        "42704"
    );
    assert_eq!(
        sqlstate_of("SELECT manna_crypt.create_keyring('Not Valid')"),
        "22023"
    );
    // The transaction is still usable after the caught errors.
    assert_eq!(one::<i32>("SELECT 1"), Some(1));
}

#[pg_test]
fn nonces_do_not_repeat_within_a_query() {
    let k = key_sql();
    let (n, distinct) = Spi::get_two::<i64, i64>(&format!(
        "SELECT count(*), \
                count(DISTINCT substr(manna_crypt.encrypt_gcm('\\x00'::bytea, {k}), 6, 12)) \
         FROM generate_series(1, 10000)"
    ))
    .expect("query");
    assert_eq!(n, Some(10000));
    assert_eq!(distinct, Some(10000));
}

fn key_status(key_id: i32) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT status FROM manna_crypt.keys WHERE key_id = $1",
        &[key_id.into()],
    )
    .expect("keys view")
}

#[pg_test]
fn keyring_create_encrypt_rotate_decrypt() {
    let k1 = one::<i32>("SELECT manna_crypt.create_keyring('pgt_ring')").expect("key id");
    assert!(k1 > 0);
    Spi::run(
        "CREATE TEMP TABLE v AS \
         SELECT 1 AS n, manna_crypt.encrypt_gcm('before', 'pgt_ring', 'row1')::text AS c",
    )
    .expect("encrypt");
    assert_eq!(
        one::<i64>("SELECT manna_crypt.key_id(c) FROM v"),
        Some(i64::from(k1))
    );

    let k2 = one::<i32>("SELECT manna_crypt.rotate_keyring('pgt_ring')").expect("key id");
    assert!(k2 > k1);
    assert_eq!(key_status(k1).as_deref(), Some("decrypt_only"));
    assert_eq!(key_status(k2).as_deref(), Some("active"));

    // New values use the new version at once, in the same transaction.
    Spi::run("INSERT INTO v SELECT 2, manna_crypt.encrypt_gcm('after', 'pgt_ring', 'row2')")
        .expect("encrypt");
    assert_eq!(
        one::<i64>("SELECT manna_crypt.key_id(c) FROM v WHERE n = 2"),
        Some(i64::from(k2))
    );

    // Both versions decrypt, and the AAD is still bound.
    let both = one::<String>(
        "SELECT string_agg(manna_crypt.decrypt_gcm(c, 'row' || n), ',' ORDER BY n) FROM v",
    );
    assert_eq!(both.as_deref(), Some("before,after"));
    assert_eq!(
        sqlstate_of("SELECT manna_crypt.decrypt_gcm(c, 'row2') FROM v WHERE n = 1"),
        "39000"
    );
    // A keyring value cannot be read with a raw key, nor a raw value via the keyring form.
    assert_eq!(
        sqlstate_of(&format!(
            "SELECT manna_crypt.decrypt_gcm(c, {}, 'row1') FROM v WHERE n = 1",
            key_sql()
        )),
        "39000"
    );
}

#[pg_test]
fn revoked_key_no_longer_decrypts() {
    let k1 = one::<i32>("SELECT manna_crypt.create_keyring('pgt_revoke')").expect("key id");
    Spi::run(
        "CREATE TEMP TABLE v AS SELECT manna_crypt.encrypt_gcm('secret', 'pgt_revoke')::text AS c",
    )
    .expect("encrypt");
    // Decrypt once so the key is in this backend's cache.
    assert_eq!(
        one::<String>("SELECT manna_crypt.decrypt_gcm(c) FROM v").as_deref(),
        Some("secret")
    );

    Spi::run_with_args("SELECT manna_crypt.revoke_key($1)", &[k1.into()]).expect("revoke");
    assert_eq!(key_status(k1).as_deref(), Some("revoked"));
    assert_eq!(
        sqlstate_of("SELECT manna_crypt.decrypt_gcm(c) FROM v"),
        "55000"
    );
    assert_eq!(
        sqlstate_of("SELECT manna_crypt.encrypt_gcm('x', 'pgt_revoke')"),
        "55000"
    );

    // Reinstated: readable again (decrypt_only), still no active key.
    Spi::run_with_args("SELECT manna_crypt.reinstate_key($1)", &[k1.into()]).expect("reinstate");
    assert_eq!(
        one::<String>("SELECT manna_crypt.decrypt_gcm(c) FROM v").as_deref(),
        Some("secret")
    );

    // Revoked and destroyed: gone for good.
    Spi::run_with_args("SELECT manna_crypt.revoke_key($1)", &[k1.into()]).expect("revoke");
    Spi::run_with_args("SELECT manna_crypt.destroy_key($1)", &[k1.into()]).expect("destroy");
    assert_eq!(key_status(k1).as_deref(), Some("destroyed"));
    assert_eq!(
        sqlstate_of("SELECT manna_crypt.decrypt_gcm(c) FROM v"),
        "55000"
    );
    assert_eq!(
        sqlstate_of(&format!("SELECT manna_crypt.reinstate_key({k1})")),
        "55000"
    );
}

#[pg_test]
fn keys_view_holds_no_key_material() {
    one::<i32>("SELECT manna_crypt.create_keyring('pgt_view')").expect("key id");
    let cols = one::<String>(
        "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute \
         WHERE attrelid = 'manna_crypt.keys'::regclass AND attnum > 0 AND NOT attisdropped",
    )
    .expect("columns");
    for forbidden in ["wrapped", "material", "secret"] {
        assert!(
            !cols.contains(forbidden),
            "keys view exposes a {forbidden} column"
        );
    }
    let bytea_cols = one::<i64>(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'manna_crypt.keys'::regclass \
         AND atttypid = 'bytea'::regtype",
    );
    assert_eq!(bytea_cols, Some(0));
}

// ---- the plumbing layer (src/pg) ------------------------------------------

/// A read through the one SPI helper assigns no transaction id: it works in
/// parallel workers and on standbys, and a read-only transaction stays one.
#[pg_test]
fn spi_reads_take_no_transaction_id() {
    use crate::pg::spi::{self, Mode};
    // SAFETY: reads the current transaction state.
    let xid = || unsafe { pg_sys::GetCurrentTransactionIdIfAny() };
    assert_eq!(xid(), pg_sys::InvalidTransactionId);
    let holder = spi::one::<i32>(Mode::Read, "SELECT manna_crypt.lock_holder('x')", &[]);
    assert_eq!(holder.ok().flatten(), None);
    let one = spi::one::<i64>(Mode::Read, "SELECT count(*) FROM manna_crypt.keys", &[]);
    assert!(one.is_ok());
    assert_eq!(xid(), pg_sys::InvalidTransactionId, "a read assigned an xid");
    // A write does, as it must.
    spi::run("CREATE TEMP TABLE spi_probe (x int)", &[]).unwrap_or_else(|_| panic!("write"));
    assert_ne!(xid(), pg_sys::InvalidTransactionId);
}

/// The three identities: the extension owner, a table's owner inside a
/// security-restricted operation, and the caller again from inside either.
#[pg_test]
fn identities_switch_and_restore() {
    use crate::pg::security::{caller_id, run_as, Identity};
    Spi::run("CREATE ROLE mc_probe_owner NOLOGIN").expect("role");
    Spi::run("CREATE TABLE public.mc_probe (x int)").expect("table");
    Spi::run("ALTER TABLE public.mc_probe OWNER TO mc_probe_owner").expect("owner");
    let table = one::<pg_sys::Oid>("SELECT 'public.mc_probe'::regclass::oid").expect("oid");
    // SAFETY: reads the current user and security context.
    let user = || unsafe { pg_sys::GetUserId() };
    let restricted = || unsafe { pg_sys::InSecurityRestrictedOperation() };
    let me = user();
    let owner = one::<pg_sys::Oid>("SELECT 'mc_probe_owner'::regrole::oid").expect("owner oid");
    let seen = run_as(Identity::TableOwner(table), || {
        let inner = run_as(Identity::Caller, || Ok((user(), caller_id())));
        Ok((user(), restricted(), inner.ok()))
    });
    let (as_owner, was_restricted, inner) = seen.unwrap_or_else(|_| panic!("run_as"));
    assert_eq!(as_owner, owner);
    assert!(was_restricted, "not a security-restricted operation");
    assert_eq!(inner, Some((me, me)), "Caller did not switch back to the caller");
    assert_eq!(user(), me, "the user was not restored");
    assert!(!restricted(), "the restriction outlived the switch");
    let path = run_as(Identity::ExtensionOwner, || {
        Ok(one::<String>("SELECT current_setting('search_path')"))
    });
    assert_eq!(path.ok().flatten().as_deref(), Some("pg_catalog, pg_temp"));
}

/// Test-only entry points into the error paths of `pg::report`.
#[pg_extern]
fn mc_test_panic() {
    panic!("a test panic");
}

#[pg_extern]
fn mc_test_spi(sql: &str) {
    use crate::error::OrRaise;
    crate::pg::spi::run(sql, &[]).or_raise()
}

/// Everything PL/pgSQL sees of the error a statement raises, '|'-separated:
/// SQLSTATE, message, detail, constraint, table, schema, context.
fn diagnostics_of(query: &str) -> String {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.diag_of(q text) RETURNS text \
         LANGUAGE plpgsql AS $f$ DECLARE s text; m text; d text; n text; t text; \
         sc text; c text; BEGIN EXECUTE q; RETURN 'ok'; EXCEPTION WHEN OTHERS THEN \
         GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, \
         d = PG_EXCEPTION_DETAIL, n = CONSTRAINT_NAME, t = TABLE_NAME, \
         sc = SCHEMA_NAME, c = PG_EXCEPTION_CONTEXT; \
         RETURN concat_ws('|', s, m, d, n, t, sc, c); END $f$",
    )
    .expect("helper");
    Spi::get_one_with_args::<String>("SELECT pg_temp.diag_of($1)", &[query.into()])
        .expect("helper call")
        .expect("non-null diagnostics")
}

/// A Rust panic (a bug) is a plain XX000 with the panic's message: no
/// DETAIL (pgrx put a backtrace there under RUST_BACKTRACE) and no Rust in
/// the context.
#[pg_test]
fn a_panic_is_a_clean_internal_error() {
    let got = diagnostics_of("SELECT tests.mc_test_panic()");
    assert!(got.starts_with("XX000|a test panic|||||"), "{got}");
    assert!(!got.contains(".rs") && !got.contains("backtrace"), "{got}");
}

/// A PostgreSQL error inside our SPI statement reaches a PL/pgSQL handler
/// with its constraint, table and schema, and the statement as context.
#[pg_test]
fn an_error_inside_our_statement_keeps_its_fields() {
    Spi::run("CREATE TABLE public.mc_uniq (x int CONSTRAINT mc_uniq_x UNIQUE)").expect("table");
    Spi::run("INSERT INTO public.mc_uniq VALUES (1)").expect("row");
    let got = diagnostics_of(
        "SELECT tests.mc_test_spi('INSERT INTO public.mc_uniq VALUES (1)')",
    );
    let want = "23505|duplicate key value violates unique constraint \"mc_uniq_x\"\
                |Key (x)=(1) already exists.|mc_uniq_x|mc_uniq|public\
                |SQL statement \"INSERT INTO public.mc_uniq VALUES (1)\"";
    assert!(got.starts_with(want), "{got}");
    assert!(!got.contains(".rs") && !got.contains("backtrace"), "{got}");
}

const COUNTED: &str = "SELECT encryptions FROM manna_crypt.keys WHERE key_id = ";
const ENCRYPT_TEN: &str =
    "SELECT manna_crypt.encrypt_gcm('v' || g, 'counted_unit') FROM generate_series(1, 10) g";

#[pg_test]
fn keyring_encryptions_are_counted_raw_ones_are_not() {
    // A delta: the test cluster's counter files outlive rolled-back tests.
    let id = one::<i32>("SELECT manna_crypt.create_keyring('counted_unit')").unwrap();
    let count = || one::<i64>(&format!("{COUNTED}{id}")).unwrap();
    let before = count();
    Spi::run(ENCRYPT_TEN).unwrap();
    Spi::run(&format!("SELECT manna_crypt.encrypt_gcm('v', {})", key_sql())).unwrap();
    assert_eq!(count() - before, 10);
}
