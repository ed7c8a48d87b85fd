SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
RESET client_min_messages;
\set VERBOSITY sqlstate
-- The raw-key AES-256-GCM functions: round trips, AAD, NULL semantics and the
-- version-1 envelope (docs/DESIGN.md section 1). Ciphertexts have random nonces,
-- so nothing here prints one: only round trips, lengths, booleans.
SET search_path = manna_crypt, public;
SELECT decode('000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f', 'hex') AS k1,
       decode('1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100', 'hex') AS k2
\gset
-- text round trip
SELECT decrypt_gcm(encrypt_gcm('hello world', :'k1'::bytea), :'k1'::bytea);
-- the result is the domain, and the text form is "mc1:" + base64 of the envelope
SELECT pg_typeof(encrypt_gcm('hello', :'k1'::bytea));
WITH c AS (SELECT encrypt_gcm('hello', :'k1'::bytea)::text AS c)
SELECT left(c, 4) AS prefix,
       length(decode(substr(c, 5), 'base64')) AS envelope_len,        -- 1 + 4 + 12 + 5 + 16
       get_byte(decode(substr(c, 5), 'base64'), 0) AS version,
       substr(decode(substr(c, 5), 'base64'), 2, 4) AS key_id_bytes,
       key_id(c) AS key_id,
       key_id(decode(substr(c, 5), 'base64')) AS key_id_bytea,
       is_encrypted(c) AS is_encrypted
FROM c;
-- a fresh nonce every call: the same plaintext never gives the same ciphertext
SELECT encrypt_gcm('same', :'k1'::bytea)::text <> encrypt_gcm('same', :'k1'::bytea)::text AS differ;
SELECT count(DISTINCT substr(decode(substr(encrypt_gcm('same', :'k1'::bytea), 5), 'base64'), 6, 12)) AS distinct_nonces
FROM generate_series(1, 1000);
-- AAD: round trip, and omitted = NULL = empty
SELECT decrypt_gcm(encrypt_gcm('with aad', :'k1'::bytea, 'user:42'), :'k1'::bytea, 'user:42');
SELECT decrypt_gcm(encrypt_gcm('no aad', :'k1'::bytea), :'k1'::bytea, '') AS omitted_then_empty,
       decrypt_gcm(encrypt_gcm('no aad', :'k1'::bytea, NULL), :'k1'::bytea) AS null_then_omitted,
       decrypt_gcm(encrypt_gcm('no aad', :'k1'::bytea, ''), :'k1'::bytea, NULL) AS empty_then_null;
-- NULL plaintext or ciphertext gives NULL
SELECT encrypt_gcm(NULL::text, :'k1'::bytea) IS NULL AS enc_text_null,
       encrypt_gcm(NULL::bytea, :'k1'::bytea) IS NULL AS enc_bytea_null,
       decrypt_gcm(NULL::text, :'k1'::bytea) IS NULL AS dec_text_null,
       decrypt_gcm(NULL::bytea, :'k1'::bytea) IS NULL AS dec_bytea_null,
       encrypt_gcm(NULL::text, :'k1'::bytea, 'aad') IS NULL AS enc_null_with_aad;
-- a NULL key is an error, even for a NULL plaintext: a missing key never
-- silently turns a value into NULL
SELECT encrypt_gcm('secret', NULL::bytea);
SELECT encrypt_gcm(NULL::text, NULL::bytea);
SELECT decrypt_gcm(encrypt_gcm('secret', :'k1'::bytea), NULL::bytea);
SELECT encrypt_gcm('\x00'::bytea, NULL::bytea);
SELECT decrypt_gcm(NULL::bytea, NULL::bytea);
-- empty plaintext is valid: a 33-byte envelope
WITH c AS (SELECT encrypt_gcm('', :'k1'::bytea) AS c)
SELECT decrypt_gcm(c, :'k1'::bytea) = '' AS empty_round_trip,
       length(decode(substr(c, 5), 'base64')) AS envelope_len
FROM c;
-- Unicode, including characters outside the Basic Multilingual Plane
SELECT decrypt_gcm(encrypt_gcm('héllo wörld — 日本語 🔐𝄞', :'k1'::bytea), :'k1'::bytea);
WITH c AS (SELECT encrypt_gcm('🔐𝄞', :'k1'::bytea) AS c)
SELECT length(decode(substr(c, 5), 'base64')) - 33 AS plaintext_bytes FROM c;
-- Unicode AAD
SELECT decrypt_gcm(encrypt_gcm('x', :'k1'::bytea, 'ключ🔑'), :'k1'::bytea, 'ключ🔑');
-- a large value (1 MB of text)
SELECT decrypt_gcm(encrypt_gcm(repeat('abcdefghij', 100000), :'k1'::bytea), :'k1'::bytea)
       = repeat('abcdefghij', 100000) AS large_round_trip;
-- several keys in one query: each row is sealed under its own key (checked
-- independently with the bare primitive) and decrypts under it
SELECT i, convert_from(decrypt_gcm(e, k), 'UTF8') AS round_trip,
       convert_from(aes_gcm_decrypt(k, substr(e, 6, 12), substr(e, 18), substr(e, 1, 5)), 'UTF8') AS primitive
FROM (SELECT i, k, encrypt_gcm(convert_to('row ' || i, 'UTF8'), k) AS e
      FROM (SELECT i, CASE WHEN i % 2 = 0 THEN :'k1'::bytea ELSE :'k2'::bytea END AS k
            FROM generate_series(1, 4) i) s) s
ORDER BY i;
-- bytea forms: binary plaintext, binary envelope
SELECT decrypt_gcm(encrypt_gcm('\x00ff10'::bytea, :'k1'::bytea), :'k1'::bytea);
SELECT length(encrypt_gcm('\x00ff10'::bytea, :'k1'::bytea)) AS envelope_len,
       get_byte(encrypt_gcm('\x00ff10'::bytea, :'k1'::bytea), 0) AS version,
       key_id(encrypt_gcm('\x00ff10'::bytea, :'k1'::bytea)) AS key_id;
SELECT decrypt_gcm(encrypt_gcm('\x'::bytea, :'k1'::bytea), :'k1'::bytea) = '\x'::bytea AS empty_bytea;
SELECT decrypt_gcm(encrypt_gcm('\xdeadbeef'::bytea, :'k1'::bytea, 'ctx'), :'k1'::bytea, 'ctx');
-- the text form is only an encoding of the envelope: the forms interoperate
SELECT convert_from(decrypt_gcm(decode(substr(encrypt_gcm('text to bytea', :'k1'::bytea, 'a'), 5), 'base64'),
                                :'k1'::bytea, 'a'), 'UTF8');
SELECT decrypt_gcm('mc1:' || encode(encrypt_gcm(convert_to('bytea to text', 'UTF8'), :'k1'::bytea), 'base64'),
                   :'k1'::bytea);
-- is_encrypted and key_id are strict
SELECT is_encrypted('hello') AS plain, is_encrypted('') AS empty, is_encrypted(NULL) IS NULL AS null_is_null,
       key_id(NULL::text) IS NULL AS key_id_null;
-- aes_gcm_decrypt: the bare primitive, against the GCM specification's
-- test cases 13, 15 and 16 (McGrew and Viega, AES-256)
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 12), 'hex'),
                       '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea) = '\x'::bytea AS tc13;
SELECT encode(aes_gcm_decrypt(
    '\xfeffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308'::bytea,
    '\xcafebabefacedbaddecaf888'::bytea,
    '\x522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015adb094dac5d93471bdec1a502270e3cc6c'::bytea),
    'hex') AS tc15;
SELECT encode(aes_gcm_decrypt(
    '\xfeffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308'::bytea,
    '\xcafebabefacedbaddecaf888'::bytea,
    '\x522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b'::bytea,
    '\xfeedfacedeadbeeffeedfacedeadbeefabaddad2'::bytea), 'hex') AS tc16;
-- NULL or omitted aad is the empty aad; NULL ciphertext gives NULL
SELECT aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 12), 'hex'),
                       '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea, NULL) = '\x'::bytea AS null_aad,
       aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 12), 'hex'),
                       '\x530f8afbc74536b9a963b4f1c4cb738b'::bytea, '\x'::bytea) = '\x'::bytea AS empty_aad,
       aes_gcm_decrypt(decode(repeat('00', 32), 'hex'), decode(repeat('00', 12), 'hex'), NULL) IS NULL AS null_ct;
-- the envelope's own layout opens with the primitive: AAD = header + caller aad
WITH e AS (SELECT encrypt_gcm(convert_to('via primitive', 'UTF8'), :'k1'::bytea, 'ctx') AS e)
SELECT convert_from(aes_gcm_decrypt(:'k1'::bytea, substr(e, 6, 12), substr(e, 18),
                                    substr(e, 1, 5) || convert_to('ctx', 'UTF8')), 'UTF8')
FROM e;
