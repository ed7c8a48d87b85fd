SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
RESET client_min_messages;
\set VERBOSITY sqlstate
-- The encrypted_text domain: a column of it holds only well-formed version-1
-- text ciphertexts; anything else is refused with SQLSTATE 23514
-- (check_violation). It says nothing about which key opens a value.
SELECT decode('000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f', 'hex') AS k1
\gset
-- encrypt_gcm's output is accepted as is
SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('ok', :'k1'::bytea)::manna_crypt.encrypted_text, :'k1'::bytea);
-- NULL is allowed (the domain has no NOT NULL)
SELECT NULL::manna_crypt.encrypted_text IS NULL AS null_ok;
-- a hand-built minimal envelope (33 bytes: empty plaintext) is well formed,
-- whatever its key id and whether or not it authenticates
SELECT ('mc1:' || encode('\x0100000007'::bytea || decode(repeat('00', 28), 'hex'), 'base64'))::manna_crypt.encrypted_text
       IS NOT NULL AS minimal_ok;
-- rejected: plaintext
SELECT 'my secret token'::manna_crypt.encrypted_text;
-- rejected: empty string
SELECT ''::manna_crypt.encrypted_text;
-- rejected: wrong prefix (another version, upper case, the bare base64);
-- with "mc1:" the same base64 is a well-formed 33-byte envelope
SELECT 'mc2:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'::manna_crypt.encrypted_text;
SELECT 'MC1:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'::manna_crypt.encrypted_text;
SELECT 'AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'::manna_crypt.encrypted_text;
-- rejected: bad base64 (invalid characters, missing padding, url-safe
-- alphabet, line breaks, trailing newline)
SELECT 'mc1:not base64!'::manna_crypt.encrypted_text;
SELECT 'mc1:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'::manna_crypt.encrypted_text;
SELECT 'mc1:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-_'::manna_crypt.encrypted_text;
-- (encode() breaks base64 lines every 76 characters; without the breaks the
-- same envelope is accepted)
WITH e AS (SELECT manna_crypt.encrypt_gcm(convert_to(repeat('x', 100), 'UTF8'), :'k1'::bytea) AS e)
SELECT manna_crypt.is_encrypted('mc1:' || encode(e, 'base64')) AS with_line_breaks,
       manna_crypt.is_encrypted('mc1:' || translate(encode(e, 'base64'), E'\n', '')) AS without_line_breaks
FROM e;
SELECT (manna_crypt.encrypt_gcm('ok', :'k1'::bytea) || E'\n')::manna_crypt.encrypted_text;
-- rejected: too short (32 bytes, one less than the minimum)
SELECT ('mc1:' || encode('\x01'::bytea || decode(repeat('00', 31), 'hex'), 'base64'))::manna_crypt.encrypted_text;
SELECT 'mc1:'::manna_crypt.encrypted_text;
-- rejected: version byte 2 (and 0) with an otherwise valid layout
SELECT ('mc1:' || encode('\x02'::bytea || decode(repeat('00', 32), 'hex'), 'base64'))::manna_crypt.encrypted_text;
SELECT ('mc1:' || encode('\x00'::bytea || decode(repeat('00', 32), 'hex'), 'base64'))::manna_crypt.encrypted_text;
-- (the same 33 bytes with version 1 are accepted)
SELECT ('mc1:' || encode('\x01'::bytea || decode(repeat('00', 32), 'hex'), 'base64'))::manna_crypt.encrypted_text IS NOT NULL AS version_1_ok;
-- a table column of the type
CREATE TABLE domain_accounts (id int PRIMARY KEY, token manna_crypt.encrypted_text);
INSERT INTO domain_accounts VALUES (1, manna_crypt.encrypt_gcm('tok-1', :'k1'::bytea));
INSERT INTO domain_accounts VALUES (2, NULL);
INSERT INTO domain_accounts VALUES (3, 'tok-3 in plaintext by mistake');
UPDATE domain_accounts SET token = 'plaintext again' WHERE id = 1;
UPDATE domain_accounts SET token = manna_crypt.encrypt_gcm('tok-2', :'k1'::bytea) WHERE id = 2;
-- a bulk load with one bad row loads nothing
INSERT INTO domain_accounts
SELECT i, CASE WHEN i = 7 THEN 'oops' ELSE manna_crypt.encrypt_gcm('tok-' || i, :'k1'::bytea) END
FROM generate_series(4, 9) i;
SELECT id, manna_crypt.decrypt_gcm(token, :'k1'::bytea) FROM domain_accounts ORDER BY id;
-- the column's type is the domain, so a driver sees its name
SELECT format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = 'domain_accounts'::regclass AND attname = 'token';
DROP TABLE domain_accounts;
