SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
RESET client_min_messages;
\set VERBOSITY sqlstate
-- Every bad input a user can give, with its SQLSTATE (docs/DESIGN.md section 6);
-- after each error its primary message is echoed too, so the message style
-- (lowercase, no trailing period, no key material) is pinned as well.
--   22P02 malformed ciphertext   22023 bad argument   39000 authentication
--   22021 not UTF-8              42704 unknown keyring or key id
--   55000 revoked key / no active key                42710 duplicate
SET search_path = manna_crypt, public;
SELECT decode('000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f', 'hex') AS k1,
       decode('1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100', 'hex') AS k2
\gset
-- a good ciphertext (42-byte envelope: header 5, nonce 12, "tamper me" 9,
-- tag 16) and its envelope, kept in psql variables and never printed
SELECT encrypt_gcm('tamper me', :'k1'::bytea, 'ctx') AS c \gset
SELECT decode(substr(:'c', 5), 'base64') AS e \gset
SELECT decrypt_gcm(:'c', :'k1'::bytea, 'ctx') AS sanity, length(:'e'::bytea) AS envelope_len;

-- 22P02: malformed text ciphertexts
SELECT decrypt_gcm('plain secret', :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc2:' || substr(:'c', 5), :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('MC1:' || substr(:'c', 5), :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(substr(:'c', 5), :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:***', :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
-- padding removed (a 34-byte envelope needs "==")
SELECT decrypt_gcm(rtrim(encrypt_gcm('x', :'k1'::bytea), '='), :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
-- the url-safe alphabet: refused as malformed, while the same envelope in
-- standard base64 is well formed and only fails to authenticate
SELECT decrypt_gcm('mc1:' || translate(encode('\x01'::bytea || decode(repeat('fb', 32), 'hex'), 'base64'), '+/', '-_'), :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:' || encode('\x01'::bytea || decode(repeat('fb', 32), 'hex'), 'base64'), :'k1'::bytea);
SELECT decrypt_gcm(:'c' || E'\n', :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:', :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
-- too short: 32 bytes with version 1
SELECT decrypt_gcm('mc1:' || encode('\x01'::bytea || decode(repeat('00', 31), 'hex'), 'base64'), :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
-- unknown version byte: 2, and 0
SELECT decrypt_gcm('mc1:' || encode(set_byte(:'e'::bytea, 0, 2), 'base64'), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:' || encode(set_byte(:'e'::bytea, 0, 0), 'base64'), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
-- the same through the keyring form (no key argument)
SELECT decrypt_gcm('plain secret');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:' || encode(set_byte(:'e'::bytea, 0, 2), 'base64'));
\echo :LAST_ERROR_MESSAGE
-- key_id() of malformed text
SELECT key_id('plain secret');
\echo :LAST_ERROR_MESSAGE
SELECT key_id('\x0100'::bytea);
\echo :LAST_ERROR_MESSAGE

-- 22P02: malformed binary envelopes
SELECT decrypt_gcm('\x'::bytea, :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(substr(:'e'::bytea, 1, 32), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(set_byte(:'e'::bytea, 0, 2), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(set_byte(:'e'::bytea, 0, 2), 'ctx');
\echo :LAST_ERROR_MESSAGE

-- 39000: authentication failures. A flipped bit anywhere: header (key id),
-- nonce, ciphertext, tag
SELECT decrypt_gcm('mc1:' || encode(set_byte(:'e'::bytea, 4, 1), 'base64'), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:' || encode(set_byte(:'e'::bytea, 5, get_byte(:'e'::bytea, 5) # 1), 'base64'), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:' || encode(set_byte(:'e'::bytea, 20, get_byte(:'e'::bytea, 20) # 128), 'base64'), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:' || encode(set_byte(:'e'::bytea, 41, get_byte(:'e'::bytea, 41) # 1), 'base64'), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
-- every single-bit flip of every byte is refused, in both forms: the 8
-- flips of the version byte as malformed, the other 328 as unauthenticated
CREATE FUNCTION pg_temp.outcome(env bytea, key bytea, aad text, as_text boolean) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF as_text THEN
        PERFORM manna_crypt.decrypt_gcm('mc1:' || encode(env, 'base64'), key, aad);
    ELSE
        PERFORM manna_crypt.decrypt_gcm(env, key, aad);
    END IF;
    RETURN 'decrypted';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END $$;
SELECT as_text, pg_temp.outcome(set_byte(:'e'::bytea, pos, get_byte(:'e'::bytea, pos) # (1 << bit)), :'k1'::bytea, 'ctx', as_text) AS outcome,
       count(*)
FROM generate_series(0, 41) pos, generate_series(0, 7) bit, (VALUES (false), (true)) v(as_text)
GROUP BY 1, 2 ORDER BY 1, 2;
-- (and the untouched envelope decrypts through the same function)
SELECT pg_temp.outcome(:'e'::bytea, :'k1'::bytea, 'ctx', true) AS untouched;
-- truncated by one byte, and one byte appended
SELECT decrypt_gcm(substr(:'e'::bytea, 1, 41), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(:'e'::bytea || '\x00'::bytea, :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
-- the bytea form with a flipped tag byte
SELECT decrypt_gcm(set_byte(:'e'::bytea, 41, get_byte(:'e'::bytea, 41) # 1), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
-- wrong AAD, missing AAD, AAD where there was none
SELECT decrypt_gcm(:'c', :'k1'::bytea, 'ctx2');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(:'c', :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(encrypt_gcm('no aad', :'k1'::bytea), :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(:'e'::bytea, :'k1'::bytea, 'CTX');
\echo :LAST_ERROR_MESSAGE
-- wrong key
SELECT decrypt_gcm(:'c', :'k2'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(:'e'::bytea, :'k2'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE

-- 22023: a raw key that is not 32 bytes, for every form
SELECT encrypt_gcm('x', decode(repeat('00', 16), 'hex'));
\echo :LAST_ERROR_MESSAGE
SELECT encrypt_gcm('x', decode(repeat('00', 33), 'hex'));
\echo :LAST_ERROR_MESSAGE
SELECT encrypt_gcm('x', '\x'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT encrypt_gcm('\x00'::bytea, decode(repeat('00', 31), 'hex'));
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(:'c', substr(:'k1'::bytea, 1, 16), 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(:'e'::bytea, :'k1'::bytea || '\x00'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
-- a NULL key
SELECT decrypt_gcm(:'c', NULL::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE

-- 22021: a binary plaintext read back as text
SELECT decrypt_gcm('mc1:' || encode(encrypt_gcm('\xff00fe'::bytea, :'k1'::bytea), 'base64'), :'k1'::bytea);
\echo :LAST_ERROR_MESSAGE
-- (the bytea form reads it)
SELECT decrypt_gcm(encrypt_gcm('\xff00fe'::bytea, :'k1'::bytea), :'k1'::bytea);

-- aes_gcm_decrypt: 22023 for key and nonce lengths, 22P02 for a ciphertext
-- too short for a tag, 39000 for a bad tag or AAD
SELECT aes_gcm_decrypt(decode(repeat('00', 16), 'hex'), decode(repeat('00', 12), 'hex'), '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 11), 'hex'), '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 16), 'hex'), '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), '\x'::bytea, '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(NULL, decode(repeat('00', 12), 'hex'), '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), NULL, '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 12), 'hex'), '\x530f8afbc74536b9a963b4f1c4cb73'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 12), 'hex'), '\x530f8afbc74536b9a963b4f1c4cb738a'::bytea);
\echo :LAST_ERROR_MESSAGE
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 12), 'hex'), '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea, '\x00'::bytea);
\echo :LAST_ERROR_MESSAGE

-- keyrings: names, unknown objects, states
SELECT encrypt_gcm('x', 'errors_no_such_ring');
\echo :LAST_ERROR_MESSAGE
SELECT encrypt_gcm('\x00'::bytea, 'errors_no_such_ring');
\echo :LAST_ERROR_MESSAGE
SELECT encrypt_gcm('x', NULL::text);
\echo :LAST_ERROR_MESSAGE
SELECT create_keyring('');
\echo :LAST_ERROR_MESSAGE
SELECT create_keyring('Errors Ring');
\echo :LAST_ERROR_MESSAGE
SELECT create_keyring('9errors');
\echo :LAST_ERROR_MESSAGE
SELECT create_keyring(repeat('e', 64));
\echo :LAST_ERROR_MESSAGE
SELECT rotate_keyring('errors_no_such_ring');
\echo :LAST_ERROR_MESSAGE
SELECT revoke_key(2147483647);
\echo :LAST_ERROR_MESSAGE
SELECT destroy_key(2147483647);
\echo :LAST_ERROR_MESSAGE
-- a raw-key value (key id 0) given to the keyring form
SELECT decrypt_gcm(:'c', 'ctx');
\echo :LAST_ERROR_MESSAGE
-- a key id that does not exist
SELECT decrypt_gcm('mc1:' || encode(overlay(:'e'::bytea PLACING '\x7fffffff'::bytea FROM 2 FOR 4), 'base64'), 'ctx');
\echo :LAST_ERROR_MESSAGE
-- a real keyring
SELECT create_keyring('errors_ring') AS ring_key \gset
SELECT create_keyring('errors_ring');
\echo :LAST_ERROR_MESSAGE
-- if_not_exists: an existing AES-GCM keyring is kept, its active key id
-- returned (a NOTICE says so); a Fernet keyring of that name is still 42710;
-- a NULL flag is 22023
SELECT create_keyring('errors_ring', if_not_exists => true) = :ring_key AS same_key;
SELECT import_fernet_key('errors_fernet_ring', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=') > 0 AS imported;
SELECT create_keyring('errors_fernet_ring', if_not_exists => true);
\echo :LAST_ERROR_MESSAGE
SELECT create_keyring('errors_ring', NULL, NULL);
\echo :LAST_ERROR_MESSAGE
SELECT encrypt_gcm('ring secret', 'errors_ring', 'ctx') AS rc \gset
SELECT decrypt_gcm(:'rc', 'ctx') AS ring_round_trip, key_id(:'rc') = :ring_key AS key_id_matches;
SELECT decrypt_gcm(:'rc', 'other');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm(:'rc');
\echo :LAST_ERROR_MESSAGE
-- a keyring value given to the raw-key form, and a raw value relabelled with
-- the keyring's key id (the header is authenticated)
SELECT decrypt_gcm(:'rc', :'k1'::bytea, 'ctx');
\echo :LAST_ERROR_MESSAGE
SELECT decrypt_gcm('mc1:' || encode(overlay(:'e'::bytea PLACING int4send(:ring_key) FROM 2 FOR 4), 'base64'), 'ctx');
\echo :LAST_ERROR_MESSAGE
-- revoked: neither decrypts nor encrypts (55000)
SELECT revoke_key(:ring_key);
-- (messages naming key ids are not echoed: ids depend on what ran before)
SELECT decrypt_gcm(:'rc', 'ctx');
SELECT encrypt_gcm('x', 'errors_ring');
\echo :LAST_ERROR_MESSAGE
SELECT destroy_key(:ring_key);
SELECT decrypt_gcm(:'rc', 'ctx');
SELECT reinstate_key(:ring_key);
-- rotating gives the keyring an active key again; the old value stays unreadable
SELECT rotate_keyring('errors_ring') > :ring_key AS rotated;
SELECT decrypt_gcm(encrypt_gcm('after rotation', 'errors_ring'));
SELECT decrypt_gcm(:'rc', 'ctx');
