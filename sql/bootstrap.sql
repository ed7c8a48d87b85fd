-- manna_crypt bootstrap: runs before any function is created.
-- Tables of key state, the audit log, the column registry, and the roles.

DO $$
BEGIN
    IF pg_catalog.current_setting('server_encoding') <> 'UTF8' THEN
        RAISE EXCEPTION 'manna_crypt requires a UTF8 database'
            USING ERRCODE = '22023',
                  DETAIL = 'text plaintexts are encrypted as UTF-8 so that other programs can read them',
                  HINT = 'CREATE DATABASE ... ENCODING ''UTF8''';
    END IF;
END
$$;

-- Roles are cluster-wide and outlive the extension; create them only once.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'manna_crypt_user') THEN
        CREATE ROLE manna_crypt_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'manna_crypt_admin') THEN
        CREATE ROLE manna_crypt_admin NOLOGIN;
    END IF;
    IF NOT pg_catalog.pg_has_role('manna_crypt_admin', 'manna_crypt_user', 'MEMBER') THEN
        GRANT manna_crypt_user TO manna_crypt_admin;
    END IF;
END
$$;

-- Global key ids: the number stored in every envelope header.
CREATE SEQUENCE manna_crypt.key_id_seq AS integer MINVALUE 1 START 1;

CREATE TABLE manna_crypt.keyrings (
    keyring_id      serial PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    kind            text NOT NULL CHECK (kind IN ('gcm', 'fernet')),
    rotation_period interval CHECK (rotation_period > interval '0'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL DEFAULT current_user,
    rotated_at      timestamptz
);

CREATE TABLE manna_crypt.data_keys (
    key_id            integer PRIMARY KEY CHECK (key_id > 0),
    keyring_id        integer NOT NULL REFERENCES manna_crypt.keyrings,
    version           integer NOT NULL CHECK (version > 0),
    status            text NOT NULL CHECK (status IN ('active', 'decrypt_only', 'revoked', 'destroyed')),
    -- AES-256-GCM(root key, data key), key id bound as associated data.
    -- NULL once destroyed (crypto-shredding).
    wrapped           bytea CHECK ((status = 'destroyed') = (wrapped IS NULL)),
    root_fingerprint  text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    -- 'data' encrypts and decrypts; 'index' computes blind-index terms.
    purpose           text NOT NULL DEFAULT 'data' CHECK (purpose IN ('data', 'index')),
    UNIQUE (keyring_id, purpose, version)
);
-- Exactly one key encrypts (one computes new index terms) per keyring.
CREATE UNIQUE INDEX data_keys_one_active ON manna_crypt.data_keys (keyring_id, purpose) WHERE status = 'active';

-- The check value of the root key the data keys are wrapped under:
-- HMAC-SHA256(root key, label), never the key.
CREATE TABLE manna_crypt.root_key_check (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    check_value bytea NOT NULL CHECK (length(check_value) = 32),
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE manna_crypt.audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    role_name text NOT NULL DEFAULT current_user,
    event     text NOT NULL,
    keyring   text,
    key_id    integer,
    detail    jsonb NOT NULL DEFAULT '{}'
);

-- Columns known to hold manna_crypt ciphertexts (see register_column()).
CREATE TABLE manna_crypt.registered_columns (
    tbl           regclass NOT NULL,
    col           name NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, col)
);

-- pg_dump keeps the (wrapped) keys, the check value and the audit trail:
-- restore plus the same root key gives back readable data.
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.keyrings', '');
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.keyrings_keyring_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.data_keys', '');
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.key_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.root_key_check', '');
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.registered_columns', '');

COMMENT ON SCHEMA manna_crypt IS 'manna_crypt: AES-256-GCM field encryption with envelope key management';
COMMENT ON TABLE manna_crypt.keyrings IS 'named keyrings (kind gcm or fernet)';
COMMENT ON TABLE manna_crypt.data_keys IS 'data keys, wrapped under the root key; no plaintext key material';
COMMENT ON TABLE manna_crypt.root_key_check IS 'check value of the root key the data keys are wrapped under (an HMAC, not the key)';
COMMENT ON TABLE manna_crypt.audit_log IS 'append-only record of key lifecycle events and migrations';
COMMENT ON TABLE manna_crypt.registered_columns IS 'columns known to hold ciphertexts';
