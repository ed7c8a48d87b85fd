-- A column of this type can only hold well-formed version-1 text
-- ciphertexts ("mc1:" + base64 of the envelope): plaintext written by
-- mistake is rejected with SQLSTATE 23514 before it reaches the table.
CREATE DOMAIN manna_crypt.encrypted_text AS text
    CONSTRAINT encrypted_text_check CHECK (manna_crypt.is_encrypted(VALUE));

COMMENT ON DOMAIN manna_crypt.encrypted_text IS 'text holding a well-formed manna_crypt version-1 ciphertext ("mc1:" + base64); rejects plaintext';
