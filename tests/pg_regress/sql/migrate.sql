SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
RESET client_min_messages;
\set VERBOSITY sqlstate
-- The in-place re-encryption procedures (docs/DESIGN.md section 4):
-- migrate_fernet, rewrap_column, encrypt_column, column_status,
-- reencrypt_runs / reencrypt_failures, and the key-retirement guard.
-- Progress NOTICEs carry rates and timings, so every CALL runs with
-- client_min_messages = warning. Ciphertexts are random: never printed;
-- key ids depend on what ran before: kept in psql variables, never printed.
SET search_path = manna_crypt, public;

-- Fernet source: the spec secret (fernet/spec verify.json) and a second key,
-- base64url(bytes 0..31), whose tokens were made with Python cryptography.
SELECT import_fernet_key('migrate_legacy', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=') > 0 AS imported_1,
       import_fernet_key('migrate_legacy', 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=') > 0 AS imported_2;
SELECT create_keyring('migrate_target') AS migrate_v1 \gset
SELECT :migrate_v1 > 0 AS created;

CREATE TABLE migrate_items (id int PRIMARY KEY, token text, note text);
SELECT enable_optimistic_locking('migrate_items');
INSERT INTO migrate_items (id, token, note) VALUES
  -- verify.json token ("hello")
  (1, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec'),
  (2, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec'),
  (3, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec'),
  (4, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec'),
  (5, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec'),
  -- under the second key: 'second key', 'ünïcødé 🔑', ''
  (6, 'gAAAAABrAnvErN4TDesBvVcCkjRzoe9-ZfEBnHgLNwCKLnbEjEHLVCooPBd00fL6meZTWJHOv6x9Oi4C3ZdcEQI7unniO2zCnQ==', 'second'),
  (7, 'gAAAAABrAnvETXMvTawv4OB1YNCOIQBOY53QmJg9Hy5o0AG4NJxzeo5-tdwZY86PgTSPkp42FPLRlmVpQOVJ5-Y2lfnjukQwJrlp5K7tr7BW-3aBFENixVU=', 'unicode'),
  (8, 'gAAAAABrAnvEG7aEgCNV5UtB3PR_Cjcx-5CtPXn57CMNudtE-cCn53IJE6XkpEmIsbnKqcnyrhgbp1tAQUSzhQmeTITWhUnHvA==', 'empty'),
  (9, NULL, 'null'),
  (10, NULL, 'null'),
  (11, 'plain secret', 'plaintext'),
  (12, 'gAAAAAbroken', 'garbage'),
  -- a token under a key that was never imported ('foreign')
  (13, 'gAAAAABrAnvEINf7KKbRECtWgCQj3WIHXApDVycw5bbIkud7SMGS8VQ8Rb0H4FNErIj-c3mhd9TzDxtUWOeCHA3GWrzOxOCv7w==', 'foreign'),
  -- invalid.json "incorrect mac"
  (14, 'gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykQUFBQUFBQUFBQQ==', 'bad mac'),
  (15, encrypt_gcm('already mc1', 'migrate_target', '15'), 'mc1'),
  (16, encrypt_gcm('already mc1', 'migrate_target', '16'), 'mc1'),
  (17, '', 'empty string'),
  (18, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec'),
  (19, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec'),
  (20, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'spec');
CREATE TABLE migrate_before AS SELECT * FROM migrate_items;

SELECT category, keyring, key_status, n FROM column_status('migrate_items', 'token');

-- dry run: reports, writes nothing (no row changed, no version bumped, no run recorded)
SELECT count(*) AS runs_before FROM reencrypt_runs WHERE tbl = 'migrate_items'::regclass \gset
SET client_min_messages = warning;
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_target', aad_column => 'id', dry_run => true) \gset
RESET client_min_messages;
SELECT count(*) AS changed_by_dry_run FROM migrate_items a JOIN migrate_before b USING (id)
 WHERE a.token IS DISTINCT FROM b.token OR a.version <> b.version;
SELECT count(*) - :runs_before AS runs_recorded_by_dry_run FROM reencrypt_runs WHERE tbl = 'migrate_items'::regclass;

-- the real run, in batches of 4 rows
SET client_min_messages = warning;
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_target', batch_size => 4, aad_column => 'id') \gset
RESET client_min_messages;
SELECT category, keyring, key_status, n FROM column_status('migrate_items', 'token');

-- converted rows decrypt (AAD = id) to the Fernet plaintexts
SELECT id, note, decrypt_gcm(token, id::text) AS plaintext
  FROM migrate_items WHERE id <= 8 OR id BETWEEN 15 AND 16 OR id >= 18 ORDER BY id;
-- with the wrong AAD they do not -> 39000
SELECT decrypt_gcm(token, 'not the id') FROM migrate_items WHERE id = 1;
-- what changed: exactly the 11 Fernet tokens under imported keys; everything
-- else byte for byte as before; the optimistic-lock version not bumped
SELECT a.id, a.token IS DISTINCT FROM b.token AS changed, a.version - b.version AS version_delta
  FROM migrate_items a JOIN migrate_before b USING (id) ORDER BY a.id;
-- the run and what it left untouched (the value is never recorded)
SELECT mode, status, source_keyring, target_keyring, batch_size, aad_column, pass > 1 AS rechecked,
       converted, failed, already, nulls, other_keyring
  FROM reencrypt_runs WHERE tbl = 'migrate_items'::regclass ORDER BY run_id DESC LIMIT 1;
SELECT f.row_key, f.value_class, f.value_length, f.reason
  FROM reencrypt_failures f JOIN reencrypt_runs r USING (run_id)
 WHERE r.tbl = 'migrate_items'::regclass ORDER BY f.row_key::int, f.run_id;
SELECT status, converted, percent_of_pass FROM reencrypt_progress
 WHERE tbl = 'migrate_items'::regclass ORDER BY run_id DESC LIMIT 1;
-- migrating registers the column
SELECT tbl, col FROM registered_columns WHERE tbl = 'migrate_items'::regclass;

-- a second run converts nothing more
SET client_min_messages = warning;
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_target', aad_column => 'id') \gset
RESET client_min_messages;
SELECT converted, failed, already, nulls FROM reencrypt_runs
 WHERE tbl = 'migrate_items'::regclass ORDER BY run_id DESC LIMIT 1;

-- a plain UPDATE does bump the version
UPDATE migrate_items SET note = 'touched' WHERE id = 11;
SELECT a.version - b.version AS version_delta FROM migrate_items a JOIN migrate_before b USING (id) WHERE id = 11;

-- rotation: new active version; the column still holds values under v1,
-- so revoking v1 is refused (55000) ...
SELECT rotate_keyring('migrate_target') AS migrate_v2 \gset
SELECT status FROM keys WHERE key_id = :migrate_v1;
SELECT revoke_key(:migrate_v1);
-- ... rewrap_column moves them to v2 (dry run first: writes nothing) ...
CREATE TABLE migrate_before_rewrap AS SELECT * FROM migrate_items;
SET client_min_messages = warning;
CALL rewrap_column('migrate_items', 'token', 'migrate_target', 1000, 'id', true) \gset
RESET client_min_messages;
SELECT count(*) AS changed_by_dry_run FROM migrate_items a JOIN migrate_before_rewrap b USING (id)
 WHERE a.token IS DISTINCT FROM b.token;
SET client_min_messages = warning;
CALL rewrap_column('migrate_items', 'token', 'migrate_target', 3, 'id') \gset
RESET client_min_messages;
SELECT category, key_id = :migrate_v2 AS is_v2, keyring, key_status, n
  FROM column_status('migrate_items', 'token');
SELECT count(*) FILTER (WHERE a.token IS DISTINCT FROM b.token) AS rewrapped,
       count(*) FILTER (WHERE a.version <> b.version) AS versions_bumped
  FROM migrate_items a JOIN migrate_before_rewrap b USING (id);
SELECT id, decrypt_gcm(token, id::text) AS plaintext FROM migrate_items WHERE id IN (1, 7, 8, 15) ORDER BY id;
SELECT converted, failed, already, nulls FROM reencrypt_runs
 WHERE tbl = 'migrate_items'::regclass ORDER BY run_id DESC LIMIT 1;
-- ... and then v1 can be revoked without force
SELECT revoke_key(:migrate_v1);
SELECT status FROM keys WHERE key_id = :migrate_v1;

-- encrypt_column: plaintext to ciphertext, in place
SELECT create_keyring('migrate_notes_ring') AS notes_v1 \gset
CREATE TABLE migrate_notes (id int PRIMARY KEY, body varchar);
INSERT INTO migrate_notes VALUES
  (1, 'first note'), (2, ''), (3, NULL), (4, 'ünïcødé 🔑 note'),
  (5, 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA=='),
  (6, encrypt_gcm('already', 'migrate_notes_ring'));
SELECT category, n FROM column_status('migrate_notes', 'body');
SET client_min_messages = warning;
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring', dry_run => true) \gset
RESET client_min_messages;
SELECT category, n FROM column_status('migrate_notes', 'body');
SET client_min_messages = warning;
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring') \gset
RESET client_min_messages;
SELECT category, keyring, key_status, n FROM column_status('migrate_notes', 'body');
SELECT id, decrypt_gcm(body) AS plaintext, body IS NULL AS is_null FROM migrate_notes WHERE id <> 5 ORDER BY id;
SELECT converted, failed, already, nulls FROM reencrypt_runs
 WHERE tbl = 'migrate_notes'::regclass ORDER BY run_id DESC LIMIT 1;
-- no aad_column: the failure is recorded without a row key
SELECT f.row_key IS NULL AS no_row_key, f.value_class, f.reason
  FROM reencrypt_failures f JOIN reencrypt_runs r USING (run_id)
 WHERE r.tbl = 'migrate_notes'::regclass;

-- 0.2.0: a CALL hands back its run id (INOUT run_id; \gset above keeps
-- every id out of this file's output, as they depend on what ran before)
SET client_min_messages = warning;
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring') \gset
RESET client_min_messages;
SELECT :run_id = max(run_id) AS returns_its_run_id FROM reencrypt_runs;
-- a dry run records nothing: its run_id is NULL
SET client_min_messages = warning;
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring', dry_run => true);
-- raise_on_failure: rows left unconverted -> 22000, after the run's last
-- COMMIT (the run is closed and recorded)
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring', raise_on_failure => true);
RESET client_min_messages;
SELECT status, failed FROM reencrypt_runs ORDER BY run_id DESC LIMIT 1;
-- ... also for a dry run, which writes nothing
SET client_min_messages = warning;
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring', dry_run => true, raise_on_failure => true);
RESET client_min_messages;
-- NULL raise_on_failure -> 22023 (after the run: it is the run's end that reads it)
SET client_min_messages = warning;
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring', raise_on_failure => NULL);
RESET client_min_messages;

-- errors
-- batch_size out of range -> 22023
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_target', batch_size => 0) \gset
CALL rewrap_column('migrate_items', 'token', 'migrate_target', -1) \gset
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring', 100001) \gset
-- not a text column -> 22023
CALL migrate_fernet('migrate_items', 'id', 'migrate_legacy', 'migrate_target') \gset
CALL encrypt_column('migrate_notes', 'no_such_column', 'migrate_notes_ring') \gset
-- aad_column that does not exist -> 22023
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_target', aad_column => 'no_such_column') \gset
-- unknown table -> 42P01
CALL migrate_fernet('migrate_no_such_table', 'token', 'migrate_legacy', 'migrate_target') \gset
-- column_status: a NULL table, a NULL or empty column name -> 22023; no such
-- column -> 42703
SELECT * FROM column_status(NULL, 'token');
\echo :LAST_ERROR_MESSAGE
SELECT * FROM column_status('migrate_items', NULL);
\echo :LAST_ERROR_MESSAGE
SELECT * FROM column_status('migrate_items', '');
SELECT * FROM column_status('migrate_items', 'no_such_column');
-- unknown keyrings -> 42704
CALL migrate_fernet('migrate_items', 'token', 'migrate_no_such_ring', 'migrate_target') \gset
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_no_such_ring') \gset
CALL rewrap_column('migrate_items', 'token', 'migrate_no_such_ring') \gset
CALL encrypt_column('migrate_notes', 'body', 'migrate_no_such_ring') \gset
-- wrong kinds of keyring -> 22023
CALL migrate_fernet('migrate_items', 'token', 'migrate_target', 'migrate_target') \gset
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_legacy') \gset
CALL encrypt_column('migrate_notes', 'body', 'migrate_legacy') \gset
-- inside a transaction block -> 25001 (they commit per batch)
BEGIN;
CALL migrate_fernet('migrate_items', 'token', 'migrate_legacy', 'migrate_target') \gset
ROLLBACK;
BEGIN;
CALL rewrap_column('migrate_items', 'token', 'migrate_target') \gset
ROLLBACK;
BEGIN;
CALL encrypt_column('migrate_notes', 'body', 'migrate_notes_ring') \gset
ROLLBACK;
-- none of the failed calls wrote anything or left a run behind
SELECT count(*) AS running FROM reencrypt_runs WHERE status = 'running';
SELECT count(*) AS changed FROM migrate_items a JOIN migrate_before_rewrap b USING (id)
 WHERE a.token IS DISTINCT FROM b.token AND a.id NOT IN (1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 18, 19, 20);

-- retiring a key that a registered column still uses is refused (55000)
-- unless forced; a revoked or destroyed key then decrypts nothing (55000)
SELECT revoke_key(:notes_v1);
SELECT destroy_key(:notes_v1);
SELECT status FROM keys WHERE key_id = :notes_v1;
SELECT revoke_key(:notes_v1, force => true);
SELECT status FROM keys WHERE key_id = :notes_v1;
SELECT decrypt_gcm(body) FROM migrate_notes WHERE id = 1;
SELECT destroy_key(:notes_v1);
SELECT destroy_key(:notes_v1, true);
SELECT status FROM keys WHERE key_id = :notes_v1;
SELECT decrypt_gcm(body) FROM migrate_notes WHERE id = 1;
SELECT category, key_status, n FROM column_status('migrate_notes', 'body');
-- register_column protects a column no procedure ran on; unregister_column
-- lifts the protection
SELECT create_keyring('migrate_manual_ring') AS manual_v1 \gset
CREATE TABLE migrate_manual (id int, secret text);
INSERT INTO migrate_manual VALUES (1, encrypt_gcm('manual', 'migrate_manual_ring'));
SELECT revoke_key(:manual_v1);
SELECT status FROM keys WHERE key_id = :manual_v1;
SELECT reinstate_key(:manual_v1);
SELECT status FROM keys WHERE key_id = :manual_v1;
SELECT register_column('migrate_manual', 'secret');
SELECT revoke_key(:manual_v1);
SELECT status FROM keys WHERE key_id = :manual_v1;
SELECT unregister_column('migrate_manual', 'secret');
SELECT revoke_key(:manual_v1);
SELECT status FROM keys WHERE key_id = :manual_v1;
RESET search_path;
