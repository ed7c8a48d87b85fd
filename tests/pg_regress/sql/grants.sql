SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS manna_crypt;
DROP ROLE IF EXISTS mc_regress_support;
RESET client_min_messages;
\set VERBOSITY sqlstate
-- Keyring grants (README "Keyring access"): the management functions'
-- errors, and a refusal naming keyring, privilege and role.
--   42704 unknown keyring or role   22023 bad argument   42501 refused
SET search_path = manna_crypt, public;
SELECT create_keyring('rg_pii') > 0 AS pii, create_keyring('rg_plaid') > 0 AS plaid;
CREATE ROLE mc_regress_support IN ROLE manna_crypt_user;
SELECT encrypt_gcm('for support', 'rg_pii') AS c_pii, encrypt_gcm('not for support', 'rg_plaid') AS c_plaid \gset

SELECT grant_keyring_access('rg_pii', 'mc_regress_support', 'decrypt');
SELECT keyring, privilege, grantee, state FROM keyring_access ORDER BY 1, 2;

-- 42704: unknown keyring, unknown role
SELECT grant_keyring_access('rg_nope', 'mc_regress_support', 'decrypt');
\echo :LAST_ERROR_MESSAGE
SELECT revoke_keyring_access('rg_nope', 'mc_regress_support', 'decrypt');
\echo :LAST_ERROR_MESSAGE
SELECT grant_keyring_access('rg_pii', 'mc_regress_nobody', 'decrypt');
\echo :LAST_ERROR_MESSAGE
-- 22023: bad privilege, bad keyring name, NULLs
SELECT grant_keyring_access('rg_pii', 'mc_regress_support', 'read');
\echo :LAST_ERROR_MESSAGE
SELECT grant_keyring_access('Bad Name', 'mc_regress_support', 'decrypt');
\echo :LAST_ERROR_MESSAGE
SELECT grant_keyring_access(NULL, 'mc_regress_support', 'decrypt');
\echo :LAST_ERROR_MESSAGE
SELECT grant_keyring_access('rg_pii', NULL, 'decrypt');
\echo :LAST_ERROR_MESSAGE
SELECT revoke_keyring_access('rg_pii', 'mc_regress_support', NULL);
\echo :LAST_ERROR_MESSAGE

-- 42501: the role decrypts rg_pii, and nothing else
SET ROLE mc_regress_support;
SELECT decrypt_gcm(:'c_pii') AS decrypted;
SELECT decrypt_gcm(:'c_plaid');
\echo :LAST_ERROR_MESSAGE
SELECT encrypt_gcm('x', 'rg_pii');
\echo :LAST_ERROR_MESSAGE
RESET ROLE;

-- revoking all; a NOTICE for what was not granted
SELECT revoke_keyring_access('rg_pii', 'mc_regress_support', 'all');
SELECT count(*) AS grants_left FROM keyring_access WHERE grantee = 'mc_regress_support';
SELECT event, keyring, detail->>'grantee' AS grantee, detail->>'privilege' AS privilege
  FROM audit_log WHERE event LIKE '%keyring_access' ORDER BY id;
DROP ROLE mc_regress_support;
