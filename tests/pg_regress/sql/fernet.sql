SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
RESET client_min_messages;
\set VERBOSITY sqlstate
-- decrypt_fernet(token, keyring) and import_fernet_key(keyring, key): the SQL
-- contract for reading legacy Fernet tokens.
--
-- Vectors: the Fernet spec (GitHub fernet/spec, commit 20dead47, also shipped
-- by pyca/cryptography in vectors/cryptography_vectors/fernet/), copied from
-- tests/vectors/fernet/{verify,invalid}.json; see tests/vectors/README.md.
-- decrypt_fernet takes no time or TTL, so only the first six invalid.json
-- cases apply (far-future timestamp and expired TTL are TTL checks).
SET search_path = manna_crypt, public;

-- the spec's secret (verify.json, invalid.json)
SELECT import_fernet_key('fernet_spec', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=') > 0 AS imported;
-- importing the same key again is a no-op that returns the same key id
SELECT import_fernet_key('fernet_spec', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=')
     = (SELECT key_id FROM keys WHERE keyring = 'fernet_spec') AS same_id;
SELECT keyring, kind, version, status FROM keys WHERE keyring = 'fernet_spec';

-- verify.json: decrypts to "hello"
SELECT decrypt_fernet('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'fernet_spec');
-- NULL token gives NULL
SELECT decrypt_fernet(NULL, 'fernet_spec') IS NULL AS null_in_null_out;

-- invalid.json, cases 1-6: each is an error, never data
-- "incorrect mac" -> 39000
SELECT decrypt_fernet('gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykQUFBQUFBQUFBQQ==', 'fernet_spec');
-- "too short" -> 22P02
SELECT decrypt_fernet('gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPA==', 'fernet_spec');
-- "invalid base64" -> 22P02
SELECT decrypt_fernet('%%%%%%%%%%%%%AECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykRtfsH-p1YsUD2Q==', 'fernet_spec');
-- "payload size not multiple of block size" -> 22P02
SELECT decrypt_fernet('gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPOm73QeoCk9uGib28Xe5vz6oxq5nmxbx_v7mrfyudzUm', 'fernet_spec');
-- "payload padding error" -> 39000 (the MAC is valid; padding is checked after it)
SELECT decrypt_fernet('gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0ODz4LEpdELGQAad7aNEHbf-JkLPIpuiYRLQ3RtXatOYREu2FWke6CnJNYIbkuKNqOhw==', 'fernet_spec');
-- "incorrect IV (causes padding error)" -> 39000
SELECT decrypt_fernet('gAAAAAAdwJ6xBQECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAkLhFLHpGtDBRLRTZeUfWgHSv49TF2AUEZ1TIvcZjK1zQ==', 'fernet_spec');
-- not a token at all -> 22P02
SELECT decrypt_fernet('hello', 'fernet_spec');
SELECT decrypt_fernet('', 'fernet_spec');

-- import_fernet_key with a bad key -> 22023
SELECT import_fernet_key('fernet_bad', 'not a key');
SELECT import_fernet_key('fernet_bad', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e');   -- 31 bytes
SELECT import_fernet_key('fernet_bad', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4e4=');
SELECT import_fernet_key('fernet_bad', 'cw/0x689RpI+jtRR7oE8h/eQsKImvJapLeSbXpwF4e4=');   -- standard, not url-safe, alphabet
SELECT import_fernet_key('', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=');         -- empty keyring name
-- a failed import creates no keyring
SELECT count(*) AS bad_keyrings FROM keys WHERE keyring = 'fernet_bad';

-- unknown keyring -> 42704
SELECT decrypt_fernet('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'fernet_no_such_keyring');
-- NULL keyring -> 22023
SELECT decrypt_fernet('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', NULL);

-- an AES-GCM keyring is not a Fernet keyring -> 22023, both ways
SELECT create_keyring('fernet_gcm_ring') > 0 AS created;
SELECT decrypt_fernet('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'fernet_gcm_ring');
SELECT import_fernet_key('fernet_gcm_ring', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=');

-- multi-key keyring (MultiFernet): a token under either key decrypts.
-- Second key: base64url(bytes 0..31); its tokens below were made with Python
-- cryptography's Fernet (plaintexts 'second key', 'ünïcødé 🔑', '').
SELECT import_fernet_key('fernet_multi', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=') > 0 AS first;
-- before the second key is imported, its tokens fail authentication
SELECT decrypt_fernet('gAAAAABrAnvErN4TDesBvVcCkjRzoe9-ZfEBnHgLNwCKLnbEjEHLVCooPBd00fL6meZTWJHOv6x9Oi4C3ZdcEQI7unniO2zCnQ==', 'fernet_multi');
SELECT import_fernet_key('fernet_multi', 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=') > 0 AS second;
SELECT version, status FROM keys WHERE keyring = 'fernet_multi' ORDER BY version;
SELECT decrypt_fernet('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'fernet_multi') AS under_first,
       decrypt_fernet('gAAAAABrAnvErN4TDesBvVcCkjRzoe9-ZfEBnHgLNwCKLnbEjEHLVCooPBd00fL6meZTWJHOv6x9Oi4C3ZdcEQI7unniO2zCnQ==', 'fernet_multi') AS under_second;
SELECT decrypt_fernet('gAAAAABrAnvETXMvTawv4OB1YNCOIQBOY53QmJg9Hy5o0AG4NJxzeo5-tdwZY86PgTSPkp42FPLRlmVpQOVJ5-Y2lfnjukQwJrlp5K7tr7BW-3aBFENixVU=', 'fernet_multi') = 'ünïcødé 🔑' AS unicode_ok,
       decrypt_fernet('gAAAAABrAnvEG7aEgCNV5UtB3PR_Cjcx-5CtPXn57CMNudtE-cCn53IJE6XkpEmIsbnKqcnyrhgbp1tAQUSzhQmeTITWhUnHvA==', 'fernet_multi') = '' AS empty_ok;
-- a token under a key that was never imported -> 39000
SELECT decrypt_fernet('gAAAAABrAnvEINf7KKbRECtWgCQj3WIHXApDVycw5bbIkud7SMGS8VQ8Rb0H4FNErIj-c3mhd9TzDxtUWOeCHA3GWrzOxOCv7w==', 'fernet_multi');
-- a token whose plaintext is not UTF-8 cannot be returned as text -> 22021
SELECT decrypt_fernet('gAAAAABrAnvEFOtdH9sohr_5_QrzWgVR8XFmyXRcJvPu-aFjzAX-BxE0KZfeh_H-A2C-fLXABGDYAKqNEgMp6B2SNMwxFam4Qg==', 'fernet_multi');
-- the spec vector still decrypts after a MAC failure in the same session
SELECT decrypt_fernet('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'fernet_spec');

-- decrypt_any(value, aad, fernet_keyring): either form, decided by prefix
SELECT encrypt_gcm('any mc1', 'fernet_gcm_ring', 'ctx') AS any_c \gset
SELECT decrypt_any(:'any_c', 'ctx') AS mc1_form,
       decrypt_any('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', NULL, 'fernet_spec') AS fernet_form,
       decrypt_any(NULL) IS NULL AS null_in_null_out;
-- wrong AAD -> 39000; a token under a foreign key -> 39000
SELECT decrypt_any(:'any_c', 'other');
SELECT decrypt_any('gAAAAABrAnvEINf7KKbRECtWgCQj3WIHXApDVycw5bbIkud7SMGS8VQ8Rb0H4FNErIj-c3mhd9TzDxtUWOeCHA3GWrzOxOCv7w==', NULL, 'fernet_spec');
-- anything else -> 22P02, naming the accepted forms, never the value
SELECT decrypt_any('a plaintext secret', NULL, 'fernet_spec');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_any('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_any('mc1:not base64');
SELECT decrypt_any('gAAAAAbroken', NULL, 'fernet_spec');
-- unknown Fernet keyring -> 42704; an AES-GCM keyring as Fernet keyring -> 22023
SELECT decrypt_any('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', NULL, 'fernet_no_such_keyring');
SELECT decrypt_any('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', NULL, 'fernet_gcm_ring');

-- value_class sees tokens without a key
SELECT label, value_class(v)
  FROM (VALUES ('spec token', 'gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA=='),
               ('broken token', 'gAAAAAbroken'), ('plaintext', 'hello'), ('empty', '')) AS t(label, v);
RESET search_path;
