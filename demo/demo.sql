-- manna_crypt demo: a walk through the main features.
-- Run by scripts/demo.sh against a throwaway cluster; safe to re-run.
\set ON_ERROR_STOP 1
\set VERBOSITY default
\pset footer off
SET client_min_messages = notice;

DROP SCHEMA IF EXISTS demo CASCADE;
CREATE SCHEMA demo;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
SET search_path = demo, manna_crypt, public;
-- Keyrings from an earlier run of the demo are removed with the database by
-- scripts/demo.sh; inside one run every name is fresh.

\echo
\echo '=== 1. AES-256-GCM with a raw key (key id 0) and associated data ==='
\echo 'encrypt_gcm returns the self-describing text form mc1:<base64 envelope>.'
SELECT gen_random_bytes(32) AS rawkey \gset
SELECT left(encrypt_gcm('access-sandbox-1234', :'rawkey'::bytea, 'item-42'), 24) || '...' AS ciphertext_prefix;
SELECT decrypt_gcm(encrypt_gcm('access-sandbox-1234', :'rawkey'::bytea, 'item-42'), :'rawkey'::bytea, 'item-42') AS round_trip;
\echo 'The same value twice gives different ciphertexts (fresh 96-bit nonce each time):'
SELECT encrypt_gcm('same', :'rawkey'::bytea) <> encrypt_gcm('same', :'rawkey'::bytea) AS differ;
\echo 'Plain SQL can inspect the envelope: version 1, key id, 12-byte nonce, ciphertext, 16-byte tag.'
SELECT get_byte(e, 0) AS version, key_id(c) AS key_id, length(e) - 33 AS plaintext_bytes
  FROM (SELECT c, decode(substr(c, 5), 'base64') AS e
          FROM (SELECT encrypt_gcm('access-sandbox-1234', :'rawkey'::bytea) AS c) s) t;

\echo
\echo '=== 2. Errors: each with its SQLSTATE, no key or plaintext in the message ==='
\set ON_ERROR_STOP 0
\set VERBOSITY verbose
\echo '-- wrong associated data (39000):'
SELECT decrypt_gcm(encrypt_gcm('secret', :'rawkey'::bytea, 'item-42'), :'rawkey'::bytea, 'item-43');
\echo '-- not a ciphertext (22P02):'
SELECT decrypt_gcm('access-sandbox-1234', :'rawkey'::bytea);
\echo '-- key of the wrong length (22023):'
SELECT encrypt_gcm('secret', '\x0011'::bytea);
\set VERBOSITY default
\set ON_ERROR_STOP 1

\echo
\echo '=== 3. The encrypted_text domain keeps plaintext out of a protected column ==='
CREATE TABLE demo.accounts (id int PRIMARY KEY, token encrypted_text);
INSERT INTO demo.accounts VALUES (1, encrypt_gcm('access-sandbox-aaaa', :'rawkey'::bytea));
\set ON_ERROR_STOP 0
INSERT INTO demo.accounts VALUES (2, 'access-sandbox-bbbb');
\set ON_ERROR_STOP 1

\echo
\echo '=== 4. Envelope keys: keyrings, rotation, old rows stay readable ==='
\echo 'The root key comes from manna_crypt.root_key_file (never a table); data keys are'
\echo 'generated in the database and stored wrapped under it.'
SELECT create_keyring('plaid_tokens', rotation_period => '90 days') AS first_key_id;
CREATE TABLE demo.secrets (id int PRIMARY KEY, v encrypted_text);
INSERT INTO demo.secrets SELECT g, encrypt_gcm('secret-' || g, 'plaid_tokens', g::text) FROM generate_series(1, 3) g;
SELECT rotate_keyring('plaid_tokens') AS new_key_id;
INSERT INTO demo.secrets SELECT g, encrypt_gcm('secret-' || g, 'plaid_tokens', g::text) FROM generate_series(4, 5) g;
SELECT id, key_id(v) AS key_id, decrypt_gcm(v, id::text) AS plaintext FROM demo.secrets ORDER BY id;
SELECT keyring, key_id, version, status FROM keys WHERE keyring = 'plaid_tokens' ORDER BY version;

\echo
\echo '=== 5. Legacy Fernet tokens migrated in place, with progress ==='
\echo 'A plaid_items table as a Python app wrote it: Fernet tokens (made here with pgcrypto,'
\echo 'following the Fernet spec, exactly as cryptography.fernet does).'
CREATE FUNCTION demo.legacy_fernet(plaintext text, fernet_key text) RETURNS text LANGUAGE sql AS $$
  SELECT translate(encode(signed || hmac(signed, substr(k, 1, 16), 'sha256'), 'base64'), E'+/\n', '-_')
    FROM (SELECT k, '\x80'::bytea || int8send(extract(epoch FROM now())::int8) || iv
                    || encrypt_iv(convert_to(plaintext, 'UTF8'), substr(k, 17, 16), iv, 'aes-cbc/pad:pkcs') AS signed
            FROM (SELECT decode(translate(fernet_key, '-_', '+/'), 'base64') AS k, gen_random_bytes(16) AS iv) a) b
$$;
SELECT translate(encode(gen_random_bytes(32), 'base64'), '+/', '-_') AS fernet_key \gset
CREATE TABLE demo.plaid_items (id int PRIMARY KEY, access_token text, cursor text);
INSERT INTO demo.plaid_items
SELECT g, legacy_fernet('access-sandbox-' || gen_random_uuid(), :'fernet_key'), 'c0' FROM generate_series(1, 20000) g;
INSERT INTO demo.plaid_items VALUES (20001, 'not-a-token', 'c0'), (20002, NULL, 'c0');
SELECT enable_optimistic_locking('demo.plaid_items');
\echo 'Import the app''s Fernet key (this is the one call that takes key material):'
SELECT import_fernet_key('legacy_fernet', :'fernet_key') AS fernet_key_id;
SELECT left(decrypt_fernet(access_token, 'legacy_fernet'), 15) || '...' AS decrypt_fernet FROM demo.plaid_items WHERE id = 1;
\echo 'Before:'
SELECT category, key_id, keyring, n FROM column_status('demo.plaid_items', 'access_token');
\echo 'Dry run, then the real run (progress NOTICEs every few seconds; commits per batch; the row id is bound as AAD; the CALL returns the run id):'
CALL migrate_fernet('demo.plaid_items', 'access_token', 'legacy_fernet', 'plaid_tokens',
                    batch_size => 5000, aad_column => 'id', dry_run => true);
CALL migrate_fernet('demo.plaid_items', 'access_token', 'legacy_fernet', 'plaid_tokens',
                    batch_size => 5000, aad_column => 'id');
\echo 'After:'
SELECT category, key_id, keyring, n FROM column_status('demo.plaid_items', 'access_token');
SELECT reason, value_class, row_key FROM reencrypt_failures ORDER BY row_key;
SELECT max(version) AS version_after_migration FROM demo.plaid_items;

\echo
\echo '=== 6. Key rotation, then rewrap_column moves old versions to the active key ==='
SELECT rotate_keyring('plaid_tokens') AS new_key_id;
CALL rewrap_column('demo.plaid_items', 'access_token', 'plaid_tokens', batch_size => 10000, aad_column => 'id');
SELECT category, key_id, keyring, n FROM column_status('demo.plaid_items', 'access_token');

\echo
\echo '=== 7. Revocation: a key still used by a registered column is protected ==='
\echo 'demo.secrets holds values under the first key; tell manna_crypt about the column:'
SELECT register_column('demo.secrets', 'v');
SELECT min(key_id) AS first_key FROM keys WHERE keyring = 'plaid_tokens' \gset
\set ON_ERROR_STOP 0
SELECT revoke_key(:first_key);
\set ON_ERROR_STOP 1
CALL rewrap_column('demo.secrets', 'v', 'plaid_tokens', aad_column => 'id');
SELECT revoke_key(:first_key);
\set ON_ERROR_STOP 0
SELECT decrypt_gcm(encrypt_gcm('x', 'plaid_tokens'), NULL) IS NOT NULL AS active_key_still_works;
\set ON_ERROR_STOP 1

\echo
\echo '=== 8. Optimistic locking: a stale write is rejected by the database ==='
SELECT version AS read_version FROM demo.plaid_items WHERE id = 1 \gset
UPDATE demo.plaid_items SET cursor = 'c1' WHERE id = 1 RETURNING version AS version_after_first_writer;
\echo 'A second worker that read version' :read_version 'now writes with that version:'
\set ON_ERROR_STOP 0
UPDATE demo.plaid_items SET cursor = 'c-stale', version = :read_version WHERE id = 1;
\set ON_ERROR_STOP 1
SELECT cursor FROM demo.plaid_items WHERE id = 1;
\echo 'Named advisory locks coordinate jobs (the same key from any language):'
SELECT lock_key('plaid_item:1') AS lock_key, try_lock_session('plaid_item:1') AS got_it, unlock('plaid_item:1') AS released;

\echo
\echo '=== 9. A protected column: the application writes plaintext, the database stores ciphertext ==='
SELECT create_keyring('pii', if_not_exists => true) IS NOT NULL AS keyring_ready;
CREATE TABLE demo.customers (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text
);
SELECT protect_column('demo.customers', 'email', 'pii', aad_column => 'id');
INSERT INTO demo.customers (email) VALUES ('ada@example.com'), ('grace@example.com');
SELECT id, left(email, 24) || '...' AS stored, decrypt_gcm(email, id::text) AS email FROM demo.customers ORDER BY id;
\echo 'Editing a ciphertext is refused (22P02), never encrypted again as if it were plaintext:'
\set ON_ERROR_STOP 0
UPDATE demo.customers SET email = email || 'x' WHERE id = 1;
\set ON_ERROR_STOP 1

\echo
\echo '=== 10. Keyring grants: a support role may decrypt pii, and nothing under plaid_tokens ==='
\echo 'A fresh install grants no keyring to anyone: administrators grant per keyring and privilege.'
SET client_min_messages = warning;
DROP ROLE IF EXISTS demo_support;
SET client_min_messages = notice;
CREATE ROLE demo_support IN ROLE manna_crypt_user;
GRANT USAGE ON SCHEMA demo TO demo_support;
GRANT SELECT ON demo.customers, demo.plaid_items TO demo_support;
SELECT grant_keyring_access('pii', 'demo_support', 'decrypt');
SELECT keyring, privilege, grantee, state FROM keyring_access ORDER BY 1, 2, 3;
SET ROLE demo_support;
SELECT id, decrypt_gcm(email, id::text) AS email FROM demo.customers ORDER BY id;
\echo 'The same role reading a bank token (42501, naming keyring, privilege and role; never the value):'
\set ON_ERROR_STOP 0
SELECT decrypt_gcm(access_token, id::text) FROM demo.plaid_items WHERE id = 1;
\set ON_ERROR_STOP 1
RESET ROLE;

\echo
\echo '=== 11. info(): versions, root key state and fingerprint (never the key), keyrings, nonce budget ==='
SELECT jsonb_pretty(info() - 'keyrings') AS info;
SELECT key_id, keyring, version, status, encryptions FROM keys ORDER BY key_id;
SELECT event, keyring, key_id FROM audit_log ORDER BY id;
