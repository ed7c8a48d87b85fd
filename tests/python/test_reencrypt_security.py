"""The re-encryption procedures as an attacker and a careless DBA meet them.

- A table owner's code (triggers, rules) runs as the table owner in a
  security-restricted operation, never with the caller's rights; the caller
  must be allowed to convert the column at all, and nothing is registered
  before that is checked.
- aad_column cannot name the converted column.
- A run that errors or is cancelled releases its lock at once, so the next
  run, from any session, resumes (a pooled connection keeps its session).
- A row that cannot be written (a CHECK) is recorded and skipped; the run
  goes on. A value too large once encrypted is 54000, never XX000.
- The per-row functions refuse to work outside their batch; a dropped
  table's OID is 42P01.
"""

import psycopg
import pytest

from conftest import connect, new_role as role, sqlstate


@pytest.fixture
def db(fresh_db):
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.create_keyring('k')")
    return fresh_db


def test_table_owner_code_never_runs_as_the_caller(db):
    with connect(db) as su:
        mallory = role(su)
        su.execute(f'GRANT CREATE ON SCHEMA public TO "{mallory}"')
        with connect(db, user=mallory) as m:
            m.execute("CREATE TABLE public.m_items (id int PRIMARY KEY, s text)")
            m.execute("INSERT INTO public.m_items SELECT g, 'secret ' || g FROM generate_series(1, 20) g")
            m.execute("CREATE TABLE public.m_seen (who text, how text)")
            # The escalation of the review: a BEFORE UPDATE trigger that makes
            # its owner superuser if it runs with a superuser's rights.
            m.execute(
                f"""CREATE FUNCTION public.m_trg() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  INSERT INTO public.m_seen VALUES (current_user, 'trigger');
                  BEGIN
                    EXECUTE 'ALTER ROLE "{mallory}" SUPERUSER';
                  EXCEPTION WHEN OTHERS THEN NULL;
                  END;
                  RETURN NEW;
                END $$"""
            )
            m.execute("CREATE TRIGGER t BEFORE UPDATE ON public.m_items FOR EACH ROW EXECUTE FUNCTION public.m_trg()")
            m.execute(
                "CREATE FUNCTION public.m_rule_fn() RETURNS int LANGUAGE sql AS "
                "$$ INSERT INTO public.m_seen VALUES (current_user, 'rule') RETURNING 1 $$"
            )
            m.execute("CREATE RULE r AS ON UPDATE TO public.m_items DO ALSO SELECT public.m_rule_fn()")
        # A superuser follows the runbook on mallory's table.
        su.execute("CALL manna_crypt.encrypt_column('public.m_items', 's', 'k')")
        assert not su.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (mallory,)
        ).fetchone()[0], "the table owner's trigger ran with the caller's rights"
        who = {r[0] for r in su.execute("SELECT who FROM public.m_seen").fetchall()}
        assert who == {mallory}
        hows = {r[0] for r in su.execute("SELECT how FROM public.m_seen").fetchall()}
        assert hows == {"trigger", "rule"}
        n, enc = su.execute(
            "SELECT count(*), count(*) FILTER (WHERE manna_crypt.is_encrypted(s)) FROM public.m_items"
        ).fetchone()
        assert (n, enc) == (20, 20)


def test_caller_needs_rights_on_the_column_and_registers_nothing_without(db):
    with connect(db) as su:
        admin = role(su, "IN ROLE manna_crypt_admin")
        su.execute("CREATE TABLE public.t (id int PRIMARY KEY, s text)")
        su.execute("INSERT INTO public.t VALUES (1, 'x')")
        with connect(db, user=admin) as a:
            assert sqlstate(a, "CALL manna_crypt.encrypt_column('public.t', 's', 'k')") == "42501"
        assert su.execute("SELECT count(*) FROM manna_crypt.registered_columns").fetchone()[0] == 0
        # Column privileges are enough (SELECT and UPDATE on the column,
        # SELECT on the AAD column).
        su.execute(f'GRANT SELECT (s, id), UPDATE (s) ON public.t TO "{admin}"')
        with connect(db, user=admin) as a:
            a.execute("CALL manna_crypt.encrypt_column('public.t', 's', 'k', aad_column => 'id')")
        assert su.execute("SELECT manna_crypt.decrypt_gcm(s, id::text) FROM public.t").fetchone()[0] == "x"


def test_aad_column_cannot_be_the_converted_column(db):
    with connect(db) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
        c.execute("INSERT INTO t VALUES (1, 'plain')")
        assert sqlstate(c, "CALL manna_crypt.encrypt_column('t', 's', 'k', aad_column => 's')") == "22023"
        assert c.execute("SELECT s FROM t").fetchone()[0] == "plain"
        assert c.execute("SELECT count(*) FROM manna_crypt.reencrypt_runs").fetchone()[0] == 0


def test_a_failing_row_is_recorded_and_skipped(db):
    with connect(db) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
        # A CHECK that only one row's ciphertext violates (its plaintext is
        # long): 0.1.0 failed that batch on every retry and recorded nothing.
        c.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g")
        c.execute("UPDATE t SET s = repeat('y', 60) WHERE id = 150")
        c.execute("ALTER TABLE t ADD CONSTRAINT short_enough CHECK (length(s) <= 100)")
        c.execute("CALL manna_crypt.encrypt_column('t', 's', 'k', batch_size => 100)")
        enc, plain = c.execute(
            "SELECT count(*) FILTER (WHERE manna_crypt.is_encrypted(s)), "
            "count(*) FILTER (WHERE NOT manna_crypt.is_encrypted(s)) FROM t"
        ).fetchone()
        assert (enc, plain) == (299, 1)
        failures = c.execute(
            "SELECT value_class, reason FROM manna_crypt.reencrypt_failures"
        ).fetchall()
        assert len(failures) == 1
        assert failures[0][0] == "plaintext"
        assert "23514" in failures[0][1] and "short_enough" in failures[0][1]
        assert "yyyy" not in failures[0][1]
        status, failed = c.execute(
            "SELECT status, failed FROM manna_crypt.reencrypt_runs ORDER BY run_id DESC LIMIT 1"
        ).fetchone()
        assert (status, failed) == ("done", 1)
        # The row's error was handled: a later error of the same kind in this
        # session is reported as itself, not as the handled one.
        try:
            c.execute("INSERT INTO t VALUES (999, repeat('z', 200))")
            raise AssertionError("the CHECK let a long value in")
        except psycopg.Error as e:
            assert e.sqlstate == "23514"
            assert "999" in (e.diag.message_detail or "")


def test_a_cancelled_run_releases_its_lock_for_any_session(db):
    with connect(db) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
        c.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 400) g")
        # Each batch of 100 rows takes a second: a trigger that sleeps.
        c.execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$"
        )
        c.execute("CREATE TRIGGER slow BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION slow()")
    pooled = connect(db)  # stays connected, as a pool's connection does
    try:
        pooled.execute("SET statement_timeout = '2500ms'")
        assert sqlstate(pooled, "CALL manna_crypt.encrypt_column('t', 's', 'k', batch_size => 100)") == "57014"
        held = pooled.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ).fetchone()[0]
        assert held == 0, "the failed run kept its lock"
        with connect(db) as other:
            notices = []
            other.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            other.execute("CALL manna_crypt.encrypt_column('t', 's', 'k', batch_size => 100)")
            assert any("resuming run" in m for m in notices)
            assert other.execute(
                "SELECT count(*) FROM t WHERE NOT manna_crypt.is_encrypted(s)"
            ).fetchone()[0] == 0
    finally:
        pooled.close()


def test_an_error_mid_run_releases_its_lock(db):
    """An error the row-by-row retry must not absorb (a lock timeout) ends
    the CALL; the session that got it can run again at once, and so can any
    other."""
    with connect(db) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
        c.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g")
    blocker = connect(db, autocommit=False)
    try:
        blocker.execute("SELECT * FROM t WHERE id = 25 FOR UPDATE")
        with connect(db) as a:
            a.execute("SET lock_timeout = '300ms'")
            assert sqlstate(a, "CALL manna_crypt.encrypt_column('t', 's', 'k')") == "55P03"
            blocker.rollback()
            # Another session, while the first one stays connected.
            with connect(db) as b:
                b.execute("CALL manna_crypt.encrypt_column('t', 's', 'k')")
                n = b.execute("SELECT count(*) FROM t WHERE NOT manna_crypt.is_encrypted(s)")
                assert n.fetchone()[0] == 0
    finally:
        blocker.close()


def test_internal_row_functions_refuse_outside_their_batch(db):
    with connect(db) as c:
        assert sqlstate(c, "SELECT manna_crypt._reencrypt_value('(0,1)', 1)") == "42501"
        assert sqlstate(c, "SELECT manna_crypt._reencrypt_row('(0,1)', 'x', NULL, 1)") == "42501"
        assert sqlstate(c, "SELECT manna_crypt._reencrypt_step(12345)") == "22023"


def test_dropped_table_oid_is_42P01(db):
    with connect(db) as c:
        c.execute("CREATE TABLE gone (s text)")
        oid = c.execute("SELECT 'gone'::regclass::oid").fetchone()[0]
        c.execute("DROP TABLE gone")
        assert sqlstate(c, f"CALL manna_crypt.encrypt_column({oid}::regclass, 's', 'k')") == "42P01"
        assert sqlstate(c, f"SELECT manna_crypt.register_column({oid}::regclass, 's')") == "42P01"
        assert sqlstate(c, f"SELECT manna_crypt.unregister_column({oid}::regclass, 's')") == "42P01"
        assert sqlstate(c, "SELECT manna_crypt.register_column(NULL, 's')") == "22023"
        assert sqlstate(c, "SELECT manna_crypt.register_column('pg_class', NULL)") == "22023"


def test_register_and_unregister_are_audited(db):
    with connect(db) as c:
        c.execute("CREATE TABLE t (s text)")
        c.execute("SELECT manna_crypt.register_column('t', 's')")
        c.execute("SELECT manna_crypt.unregister_column('t', 's')")
        events = [r[0] for r in c.execute(
            "SELECT event FROM manna_crypt.audit_log WHERE event LIKE '%register_column' ORDER BY id"
        ).fetchall()]
        assert events == ["register_column", "unregister_column"]


def test_too_large_once_encrypted_is_54000(db):
    with connect(db) as c:
        n = 805_306_368  # its ciphertext's base64 passes 1 GB
        assert sqlstate(
            c, f"SELECT length(manna_crypt.encrypt_gcm(repeat('x', {n}), 'k'))"
        ) == "54000"
        c.execute("CREATE TABLE big (id int PRIMARY KEY, s text)")
        c.execute(f"INSERT INTO big VALUES (1, repeat('x', {n})), (2, 'small')")
        c.execute("CALL manna_crypt.encrypt_column('big', 's', 'k')")
        assert c.execute(
            "SELECT id FROM big WHERE manna_crypt.is_encrypted(s) ORDER BY id"
        ).fetchall() == [(2,)]
        reason = c.execute("SELECT reason FROM manna_crypt.reencrypt_failures").fetchone()[0]
        assert "1 GB" in reason
