SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
RESET client_min_messages;
\set VERBOSITY sqlstate
-- Optimistic locking (docs/DESIGN.md section 5) and named advisory locks.
-- Errors print their SQLSTATE; the primary message is echoed after the
-- interesting ones. The stale-version errors are shown with VERBOSITY default
-- so the message, DETAIL (expected/current) and HINT are pinned too.
--   40001 stale version   39P01 trigger misuse   42703 no such column
--   42804 not an integer version column          22023 bad argument
--   55P03 lock not available (tested from two sessions in Python)
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS lk CASCADE;
RESET client_min_messages;
CREATE SCHEMA lk;
SET search_path = lk, public;

----------------------------------------------------------------------------
-- enable_optimistic_locking: adds bigint NOT NULL DEFAULT 1 when missing
----------------------------------------------------------------------------
CREATE TABLE items (id int PRIMARY KEY, x text);
INSERT INTO items VALUES (1, 'a'), (2, 'b');
SELECT manna_crypt.enable_optimistic_locking('items');
SELECT a.attname, a.atttypid::regtype, a.attnotnull, pg_get_expr(d.adbin, d.adrelid) AS default
  FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = 'items'::regclass AND a.attname = 'version';
SELECT tgname, tgenabled, pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'items'::regclass;
-- existing rows got version 1
SELECT * FROM items ORDER BY id;

----------------------------------------------------------------------------
-- the semantics table
----------------------------------------------------------------------------
-- equal (version not mentioned): plain update, bump
UPDATE items SET x = 'a2' WHERE id = 1 RETURNING *;
-- equal (version = the version read): compare-and-set / server-side counter, bump
UPDATE items SET x = 'a3', version = 2 WHERE id = 1 RETURNING *;
-- equal, spelled SET version = version: bump
UPDATE items SET version = version WHERE id = 1 RETURNING *;
-- OLD + 1: client-side counter, accepted as is (not bumped twice)
UPDATE items SET x = 'a4', version = 5 WHERE id = 1 RETURNING *;
UPDATE items SET x = 'a5', version = version + 1 WHERE id = 1 RETURNING *;
-- the row is now at version 6; anything else is a stale write: 40001
\set VERBOSITY default
UPDATE items SET x = 'stale', version = 5 WHERE id = 1;
UPDATE items SET x = 'stale', version = 1 WHERE id = 1;
UPDATE items SET x = 'ahead', version = 8 WHERE id = 1;
UPDATE items SET x = 'ahead', version = 9223372036854775807 WHERE id = 1;
UPDATE items SET x = 'negative', version = -6 WHERE id = 1;
\set VERBOSITY sqlstate
UPDATE items SET x = 'stale', version = 0 WHERE id = 1;
-- the failed updates changed nothing
SELECT * FROM items ORDER BY id;
-- the same check per row: one stale row fails the whole statement
UPDATE items SET x = x || '!', version = 1 WHERE id IN (1, 2);
SELECT * FROM items ORDER BY id;
-- a multi-row plain update bumps every row
UPDATE items SET x = x || '+' RETURNING *;
-- setting the version to NULL asserts nothing: a plain update, bump
UPDATE items SET version = NULL WHERE id = 2 RETURNING *;
-- in a transaction the 40001 aborts it, and the rollback keeps the old row
BEGIN;
UPDATE items SET x = 'in tx' WHERE id = 2;
UPDATE items SET x = 'stale in tx', version = 1 WHERE id = 2;
SELECT 1;
ROLLBACK;
SELECT * FROM items WHERE id = 2;

----------------------------------------------------------------------------
-- INSERT
----------------------------------------------------------------------------
INSERT INTO items (id, x) VALUES (3, 'default') RETURNING *;
INSERT INTO items (id, x, version) VALUES (4, 'null', NULL) RETURNING *;
INSERT INTO items (id, x, version) VALUES (5, 'explicit', 42) RETURNING *;
-- a nullable version column: NULL on INSERT becomes 1 too
CREATE TABLE nullable (id int PRIMARY KEY, version bigint);
SELECT manna_crypt.enable_optimistic_locking('nullable');
INSERT INTO nullable VALUES (1, NULL) RETURNING *;
-- a row written before the trigger existed (NULL version) adopts 1 ...
ALTER TABLE nullable DISABLE TRIGGER manna_crypt_optimistic_lock;
INSERT INTO nullable VALUES (2, NULL), (3, NULL);
ALTER TABLE nullable ENABLE TRIGGER manna_crypt_optimistic_lock;
UPDATE nullable SET id = id WHERE id = 2 RETURNING *;
-- ... unless the writer asserts a version, which is then taken as is
UPDATE nullable SET version = 7 WHERE id = 3 RETURNING *;

----------------------------------------------------------------------------
-- enable_optimistic_locking: existing integer columns, idempotence, refusals
----------------------------------------------------------------------------
CREATE TABLE small (id int PRIMARY KEY, x text, v smallint NOT NULL DEFAULT 1);
CREATE TABLE medium (id int PRIMARY KEY, x text, lock_version integer NOT NULL DEFAULT 0);
INSERT INTO small VALUES (1, 'a', 32766);
INSERT INTO medium VALUES (1, 'a', 0);
SELECT manna_crypt.enable_optimistic_locking('small', 'v');
SELECT manna_crypt.enable_optimistic_locking('medium', 'lock_version');
-- the existing columns keep their types; no column was added
SELECT attrelid::regclass, attname, atttypid::regtype FROM pg_attribute
 WHERE attrelid IN ('small'::regclass, 'medium'::regclass) AND attnum > 0 ORDER BY 1, attnum;
UPDATE small SET x = 'b' WHERE id = 1 RETURNING *;
UPDATE medium SET x = 'b' WHERE id = 1 RETURNING *;
UPDATE medium SET x = 'c', lock_version = 2 WHERE id = 1 RETURNING *;
UPDATE medium SET x = 'stale', lock_version = 1 WHERE id = 1;
\echo :LAST_ERROR_MESSAGE
-- smallint at its maximum cannot be bumped: 22023, not a wrap-around
UPDATE small SET x = 'c' WHERE id = 1;
\echo :LAST_ERROR_MESSAGE
SELECT * FROM small;
-- idempotent: a second call leaves one trigger and one column
SELECT manna_crypt.enable_optimistic_locking('items');
SELECT manna_crypt.enable_optimistic_locking('items');
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'items'::regclass AND NOT tgisinternal;
SELECT count(*) AS version_columns FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'version';
SELECT * FROM items ORDER BY id;
-- calling it again for another column moves the trigger there
ALTER TABLE medium ADD COLUMN v2 bigint NOT NULL DEFAULT 10;
SELECT manna_crypt.enable_optimistic_locking('medium', 'v2');
SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'medium'::regclass;
UPDATE medium SET x = 'd' WHERE id = 1 RETURNING *;
-- names that need quoting: table, schema and column
CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."Odd Table" (id int PRIMARY KEY, x text);
INSERT INTO "Odd Schema"."Odd Table" VALUES (1, 'a');
SELECT manna_crypt.enable_optimistic_locking('"Odd Schema"."Odd Table"', 'Row Version');
UPDATE "Odd Schema"."Odd Table" SET x = 'b' RETURNING *;
UPDATE "Odd Schema"."Odd Table" SET x = 'c', "Row Version" = 1;
\echo :LAST_ERROR_MESSAGE
SELECT manna_crypt.disable_optimistic_locking('"Odd Schema"."Odd Table"');
SET client_min_messages = warning;
DROP SCHEMA "Odd Schema" CASCADE;
RESET client_min_messages;
-- a text column is refused: 42804, and nothing is installed
CREATE TABLE texty (id int PRIMARY KEY, version text);
SELECT manna_crypt.enable_optimistic_locking('texty');
\echo :LAST_ERROR_MESSAGE
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'texty'::regclass;
-- numeric is not an integer type either
CREATE TABLE numeric_v (id int PRIMARY KEY, version numeric);
SELECT manna_crypt.enable_optimistic_locking('numeric_v');
-- no such table
SELECT manna_crypt.enable_optimistic_locking('no_such_table');
-- a NULL table, a NULL or empty column name: 22023, and nothing is installed
SELECT manna_crypt.enable_optimistic_locking(NULL);
\echo :LAST_ERROR_MESSAGE
SELECT manna_crypt.enable_optimistic_locking(NULL, 'v');
SELECT manna_crypt.enable_optimistic_locking('texty', NULL);
\echo :LAST_ERROR_MESSAGE
SELECT manna_crypt.enable_optimistic_locking('texty', '');
\echo :LAST_ERROR_MESSAGE
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'texty'::regclass;

----------------------------------------------------------------------------
-- disable_optimistic_locking: the trigger goes, the column stays
----------------------------------------------------------------------------
SELECT manna_crypt.disable_optimistic_locking('items');
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'items'::regclass AND NOT tgisinternal;
SELECT a.atttypid::regtype, a.attnotnull FROM pg_attribute a
 WHERE a.attrelid = 'items'::regclass AND a.attname = 'version';
-- no bump and no check any more
UPDATE items SET x = 'free' WHERE id = 1 RETURNING *;
UPDATE items SET version = 1 WHERE id = 1 RETURNING *;
-- disabling twice is fine; enabling again restores the check
SELECT manna_crypt.disable_optimistic_locking('items');
SELECT manna_crypt.enable_optimistic_locking('items');
UPDATE items SET x = 'checked' WHERE id = 1 RETURNING *;
UPDATE items SET version = 1 WHERE id = 1;

----------------------------------------------------------------------------
-- trigger misuse: 39P01 / 42703 / 42804, raised when the trigger fires
----------------------------------------------------------------------------
CREATE TABLE misuse (id int PRIMARY KEY, version bigint NOT NULL DEFAULT 1, label text, n numeric);
INSERT INTO misuse VALUES (1, 1, 'x', 1);
-- AFTER row trigger
CREATE TRIGGER bad AFTER UPDATE ON misuse FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump();
UPDATE misuse SET label = 'y';
\echo :LAST_ERROR_MESSAGE
DROP TRIGGER bad ON misuse;
-- BEFORE statement-level trigger
CREATE TRIGGER bad BEFORE UPDATE ON misuse FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt.version_bump();
UPDATE misuse SET label = 'y';
\echo :LAST_ERROR_MESSAGE
DROP TRIGGER bad ON misuse;
-- AFTER statement-level trigger
CREATE TRIGGER bad AFTER INSERT ON misuse FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt.version_bump();
INSERT INTO misuse VALUES (2, 1, 'x', 1);
DROP TRIGGER bad ON misuse;
-- BEFORE DELETE row trigger
CREATE TRIGGER bad BEFORE DELETE ON misuse FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump();
DELETE FROM misuse WHERE id = 1;
\echo :LAST_ERROR_MESSAGE
DROP TRIGGER bad ON misuse;
-- INSTEAD OF on a view
CREATE VIEW misuse_v AS SELECT * FROM misuse;
CREATE TRIGGER bad INSTEAD OF UPDATE ON misuse_v FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump();
UPDATE misuse_v SET label = 'y';
DROP VIEW misuse_v;
-- two arguments
CREATE TRIGGER bad BEFORE UPDATE ON misuse FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump('version', 'label');
UPDATE misuse SET label = 'y';
\echo :LAST_ERROR_MESSAGE
DROP TRIGGER bad ON misuse;
-- missing column (the default name "version" is absent, or a named one is)
CREATE TRIGGER bad BEFORE UPDATE ON misuse FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump('no_such_column');
UPDATE misuse SET label = 'y';
\echo :LAST_ERROR_MESSAGE
DROP TRIGGER bad ON misuse;
CREATE TABLE noversion (id int PRIMARY KEY);
CREATE TRIGGER bad BEFORE INSERT ON noversion FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump();
INSERT INTO noversion VALUES (1);
\echo :LAST_ERROR_MESSAGE
-- non-integer columns
CREATE TRIGGER bad BEFORE UPDATE ON misuse FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump('label');
UPDATE misuse SET label = 'y';
\echo :LAST_ERROR_MESSAGE
DROP TRIGGER bad ON misuse;
CREATE TRIGGER bad BEFORE INSERT ON misuse FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump('n');
INSERT INTO misuse VALUES (3, 1, 'x', 1);
DROP TRIGGER bad ON misuse;
-- nothing was changed by the failed statements
SELECT * FROM misuse;
-- a correctly declared trigger on the same table works
CREATE TRIGGER good BEFORE INSERT OR UPDATE ON misuse FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump('version');
UPDATE misuse SET label = 'z' RETURNING *;

----------------------------------------------------------------------------
-- lock_key: a stable, documented mapping (tests/python checks the same
-- numbers with hashlib: first 8 bytes of sha256('manna_crypt:' || name),
-- signed big-endian)
----------------------------------------------------------------------------
SELECT manna_crypt.lock_key('plaid_item:42');
SELECT manna_crypt.lock_key('job');
SELECT manna_crypt.lock_key('é');
SELECT manna_crypt.lock_key(repeat('x', 200)) IS NOT NULL AS two_hundred_bytes_ok;
SELECT manna_crypt.lock_key(NULL) IS NULL AS null_in_null_out;
SELECT manna_crypt.lock_key('a') <> manna_crypt.lock_key('A') AS case_sensitive;

----------------------------------------------------------------------------
-- named locks within one session
----------------------------------------------------------------------------
SELECT manna_crypt.lock_holder('job') AS nobody;
SELECT manna_crypt.try_lock_session('job');
SELECT manna_crypt.lock_holder('job') = pg_backend_pid() AS held_by_me;
-- it shows in pg_locks under its key, like pg_advisory_lock(lock_key(name))
SELECT count(*) FROM pg_locks
 WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND objsubid = 1
   AND ((classid::int8 << 32) | objid::int8) = manna_crypt.lock_key('job');
-- session locks are re-entrant: three holds need three unlocks
SELECT manna_crypt.try_lock_session('job');
SELECT manna_crypt.lock_session('job', '1 second');
SELECT manna_crypt.unlock('job');
SELECT manna_crypt.unlock('job');
SELECT manna_crypt.lock_holder('job') = pg_backend_pid() AS still_held;
SELECT manna_crypt.unlock('job');
SELECT manna_crypt.lock_holder('job') AS released;
-- unlocking a lock not held: false, with PostgreSQL's WARNING
SELECT manna_crypt.unlock('job');
-- transaction-scoped locks end with the transaction, commit or rollback
BEGIN;
SELECT manna_crypt.lock_xact('tx', '1 second');
SELECT manna_crypt.try_lock_xact('tx2');
SELECT manna_crypt.lock_holder('tx') = pg_backend_pid() AS tx_held,
       manna_crypt.lock_holder('tx2') = pg_backend_pid() AS tx2_held;
-- unlock() does not release a transaction lock
SELECT manna_crypt.unlock('tx');
COMMIT;
SELECT manna_crypt.lock_holder('tx') AS tx_after_commit, manna_crypt.lock_holder('tx2') AS tx2_after_commit;
BEGIN;
SELECT manna_crypt.lock_xact('tx');
ROLLBACK;
SELECT manna_crypt.lock_holder('tx') AS tx_after_rollback;
-- the lock_timeout used for the wait does not leak into the session, and
-- the session's own setting survives it
SHOW lock_timeout;
BEGIN;
SELECT manna_crypt.lock_xact('tx', '3 seconds');
SHOW lock_timeout;
COMMIT;
SHOW lock_timeout;
SET lock_timeout = '7s';
SELECT manna_crypt.lock_session('tx', '250 milliseconds');
SHOW lock_timeout;
SELECT manna_crypt.unlock('tx');
RESET lock_timeout;

----------------------------------------------------------------------------
-- bad lock names and timeouts: 22023
----------------------------------------------------------------------------
SELECT manna_crypt.lock_key('');
\echo :LAST_ERROR_MESSAGE
SELECT manna_crypt.lock_key(repeat('x', 201));
SELECT manna_crypt.lock_key(repeat('é', 101));
SELECT manna_crypt.try_lock_session('');
SELECT manna_crypt.try_lock_xact('');
SELECT manna_crypt.lock_session('');
SELECT manna_crypt.lock_xact('', '1 second');
SELECT manna_crypt.unlock('');
SELECT manna_crypt.lock_holder('');
SELECT manna_crypt.lock_xact('job', '-1 second');
\echo :LAST_ERROR_MESSAGE
-- nothing was left held by the failed calls
SELECT count(*) AS advisory_locks_held FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();

SET client_min_messages = warning;
DROP SCHEMA lk CASCADE;
RESET client_min_messages;
RESET search_path;
