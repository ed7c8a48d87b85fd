//! One error type for everything a user can get wrong, each variant mapped to
//! exactly one SQLSTATE (docs/DESIGN.md section 6, and PostgreSQL's own codes
//! where the condition is PostgreSQL's: a lock, a privilege, a column).
//!
//! An error that can arise in more than one place has one constructor here
//! (`unknown_keyring`, `unknown_key`, `version_overflow`), so it reads the
//! same wherever it comes from.
//!
//! Messages follow PostgreSQL style: lowercase, no trailing period, specifics
//! in DETAIL and HINT. No variant can carry key material or plaintext: they
//! hold names, lengths and ids only.

use manna_crypt_core::aead::AuthError;
use manna_crypt_core::envelope::FormatError;
use manna_crypt_core::fernet::FernetError;
use manna_crypt_core::names::BadName;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;

#[derive(Debug)]
pub enum McError {
    /// 22P02: not a well-formed ciphertext or token.
    Malformed { what: &'static str, detail: String },
    /// 22P02: a value in none of the forms a function accepts
    /// (`decrypt_any`); the message names the forms, never the value.
    NotCiphertext {
        message: String,
        detail: String,
        hint: Option<String>,
    },
    /// 22000: a re-encryption run called with `raise_on_failure` left rows
    /// unconverted (raised after its last commit: the rest is converted).
    RowsLeft {
        message: String,
        detail: String,
        hint: String,
    },
    /// 22023: an argument is out of range or of the wrong shape.
    BadArgument {
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// 39000: authentication failed (wrong key, wrong AAD, tampering).
    Unauthenticated { detail: String },
    /// 42704: no such keyring or key id.
    UnknownObject {
        message: String,
        hint: Option<String>,
    },
    /// 55000: key revoked or destroyed; keyring has no active key; or another
    /// object state that forbids the operation.
    WrongState {
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// 58P01: root key not configured or its file does not exist.
    RootKeyMissing {
        message: String,
        hint: Option<String>,
    },
    /// 58030: root key unreadable, bad permissions, bad content, command failed.
    RootKeyIo {
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// F0000: the root key does not match the stored check value.
    RootKeyMismatch { detail: String },
    /// 40001: optimistic locking found a stale row version.
    StaleVersion {
        table: String,
        expected: i64,
        current: i64,
    },
    /// 22021: decrypted bytes are not valid UTF-8 but text was asked for
    /// (PostgreSQL's own code for an invalid byte sequence).
    NotUtf8,
    /// 42710: the object already exists.
    Duplicate(String),
    /// XX000: a bug in manna_crypt, never the user's input.
    Internal(String),
    /// 25001: a procedure that commits was called inside a transaction block.
    InTransactionBlock { message: String, hint: String },
    /// 55P03: a lock is held by another session (a named lock, a run).
    LockNotAvailable { message: String, hint: String },
    /// 39P01: a trigger function fired in a way it cannot work.
    TriggerMisuse { message: String, hint: String },
    /// 42703: a column named by the caller does not exist.
    UndefinedColumn { message: String, hint: String },
    /// 42804: a column named by the caller has the wrong type.
    WrongType { message: String, hint: String },
    /// 42501: the caller lacks a privilege.
    PermissionDenied { message: String, hint: String },
    /// 42P01: a table named by OID does not exist (any more).
    UndefinedTable { message: String },
    /// 54000: a value would exceed PostgreSQL's 1 GB limit.
    TooLarge { message: String, detail: String },
    /// 23514: a value that a protected column's CHECK refuses (the protect
    /// trigger was bypassed). Never names the row's values.
    CheckViolation {
        message: String,
        detail: String,
        hint: String,
    },
    /// 53400: a limit set by a server setting is reached (the usage
    /// counters' shared memory).
    LimitExceeded {
        message: String,
        detail: String,
        hint: String,
    },
    /// 22004: a NULL where a value is needed (a protected column's AAD).
    NullValue { message: String, hint: String },
    /// 58030: a usage counter file cannot be read, parsed or written.
    CounterIo { message: String, detail: String },
}

pub type McResult<T> = Result<T, McError>;

impl McError {
    pub fn bad_arg(message: impl Into<String>) -> Self {
        McError::BadArgument {
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn unknown_keyring(name: &str) -> Self {
        McError::UnknownObject {
            message: format!("keyring \"{name}\" does not exist"),
            hint: Some(
                "see SELECT * FROM manna_crypt.keys; create it with manna_crypt.create_keyring()"
                    .into(),
            ),
        }
    }

    pub fn unknown_key(key_id: i64) -> Self {
        McError::UnknownObject {
            message: format!("key id {key_id} does not exist"),
            hint: Some("see SELECT * FROM manna_crypt.keys".into()),
        }
    }

    /// An optimistic-locking version that would pass its type's maximum.
    pub fn version_overflow(table: &str, col: &str) -> Self {
        McError::BadArgument {
            message: format!("version column \"{col}\" of table \"{table}\" overflowed"),
            detail: None,
            hint: Some("use a bigint version column".into()),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            McError::Malformed { .. } => Code::ERRCODE_INVALID_TEXT_REPRESENTATION,
            McError::NotCiphertext { .. } => Code::ERRCODE_INVALID_TEXT_REPRESENTATION,
            McError::RowsLeft { .. } => Code::ERRCODE_DATA_EXCEPTION,
            McError::BadArgument { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            McError::Unauthenticated { .. } => Code::ERRCODE_EXTERNAL_ROUTINE_INVOCATION_EXCEPTION,
            McError::UnknownObject { .. } => Code::ERRCODE_UNDEFINED_OBJECT,
            McError::WrongState { .. } => Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            McError::RootKeyMissing { .. } => Code::ERRCODE_UNDEFINED_FILE,
            McError::RootKeyIo { .. } => Code::ERRCODE_IO_ERROR,
            McError::RootKeyMismatch { .. } => Code::ERRCODE_CONFIG_FILE_ERROR,
            McError::StaleVersion { .. } => Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            McError::NotUtf8 => Code::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            McError::Internal(_) => Code::ERRCODE_INTERNAL_ERROR,
            McError::Duplicate(_) => Code::ERRCODE_DUPLICATE_OBJECT,
            McError::InTransactionBlock { .. } => Code::ERRCODE_ACTIVE_SQL_TRANSACTION,
            McError::LockNotAvailable { .. } => Code::ERRCODE_LOCK_NOT_AVAILABLE,
            McError::TriggerMisuse { .. } => Code::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            McError::UndefinedColumn { .. } => Code::ERRCODE_UNDEFINED_COLUMN,
            McError::WrongType { .. } => Code::ERRCODE_DATATYPE_MISMATCH,
            McError::PermissionDenied { .. } => Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            McError::UndefinedTable { .. } => Code::ERRCODE_UNDEFINED_TABLE,
            McError::TooLarge { .. } => Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            McError::CheckViolation { .. } => Code::ERRCODE_CHECK_VIOLATION,
            McError::NullValue { .. } => Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            McError::LimitExceeded { .. } => Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            McError::CounterIo { .. } => Code::ERRCODE_IO_ERROR,
        }
    }

    fn parts(self) -> (String, Option<String>, Option<String>) {
        match self {
            McError::Malformed { what, detail } => {
                (format!("malformed {what}"), Some(detail), None)
            }
            McError::NotCiphertext {
                message,
                detail,
                hint,
            } => (message, Some(detail), hint),
            McError::RowsLeft {
                message,
                detail,
                hint,
            } => (message, Some(detail), Some(hint)),
            McError::BadArgument {
                message,
                detail,
                hint,
            } => (message, detail, hint),
            McError::Unauthenticated { detail } => (
                "decryption failed: wrong key or corrupt data".into(),
                Some(detail),
                Some("check the key and the associated data (aad) used at encryption".into()),
            ),
            McError::UnknownObject { message, hint } => (message, None, hint),
            McError::WrongState {
                message,
                detail,
                hint,
            } => (message, detail, hint),
            McError::RootKeyMissing { message, hint } => (message, None, hint),
            McError::RootKeyIo {
                message,
                detail,
                hint,
            } => (message, detail, hint),
            McError::RootKeyMismatch { detail } => (
                "root key does not match".into(),
                Some(detail),
                Some(
                    "configure the root key these data keys were created under, or set \
                     manna_crypt.previous_root_key_file and call manna_crypt.rewrap_keys()"
                        .into(),
                ),
            ),
            McError::StaleVersion {
                table,
                expected,
                current,
            } => (
                format!("stale row version for table \"{table}\""),
                Some(format!(
                    "the update expected version {expected}, but the current version is {current}"
                )),
                Some("reread the row and retry the update".into()),
            ),
            McError::NotUtf8 => (
                "decrypted value is not valid text".into(),
                Some(
                    "the value authenticated, but its plaintext is not UTF-8 or contains a NUL \
                     byte"
                        .into(),
                ),
                Some(
                    "use the bytea form: decrypt_gcm(decode(substr(ciphertext, 5), 'base64'), ...)"
                        .into(),
                ),
            ),
            McError::Internal(message) => (message, None, None),
            McError::Duplicate(message) => (message, None, None),
            McError::InTransactionBlock { message, hint }
            | McError::LockNotAvailable { message, hint }
            | McError::TriggerMisuse { message, hint }
            | McError::UndefinedColumn { message, hint }
            | McError::WrongType { message, hint }
            | McError::PermissionDenied { message, hint } => (message, None, Some(hint)),
            McError::UndefinedTable { message } => (message, None, None),
            McError::TooLarge { message, detail } | McError::CounterIo { message, detail } => {
                (message, Some(detail), None)
            }
            McError::CheckViolation {
                message,
                detail,
                hint,
            }
            | McError::LimitExceeded {
                message,
                detail,
                hint,
            } => (message, Some(detail), Some(hint)),
            McError::NullValue { message, hint } => (message, None, Some(hint)),
        }
    }

    /// The primary message alone, for reports that must stay short (the
    /// re-encryption failure table). Never contains key material.
    pub fn message(self) -> String {
        self.parts().0
    }

    /// Raises the error as a PostgreSQL ERROR. Never returns.
    ///
    /// pgrx's `ErrorReport` records this call site and unwinds as a panic;
    /// the panic hook of `pg::report` (installed in `_PG_init`) drops the
    /// call site, so the client and the log get the SQLSTATE, message,
    /// DETAIL and HINT with no source location and no backtrace.
    pub fn raise(self) -> ! {
        let code = self.code();
        let (message, detail, hint) = self.parts();
        let mut report = ErrorReport::new(code, message, "manna_crypt");
        if let Some(d) = detail {
            report = report.set_detail(d);
        }
        if let Some(h) = hint {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) does not return")
    }
}

impl From<FormatError> for McError {
    fn from(e: FormatError) -> Self {
        McError::Malformed {
            what: "ciphertext",
            detail: e.to_string(),
        }
    }
}

impl From<AuthError> for McError {
    fn from(_: AuthError) -> Self {
        McError::Unauthenticated {
            detail: "the AES-GCM authentication tag did not verify".into(),
        }
    }
}

impl From<FernetError> for McError {
    fn from(e: FernetError) -> Self {
        match e {
            FernetError::Malformed(why) => McError::Malformed {
                what: "fernet token",
                detail: why.into(),
            },
            FernetError::Unauthenticated => McError::Unauthenticated {
                detail: "no key of the keyring verifies the Fernet token's HMAC, or its \
                         padding is invalid"
                    .into(),
            },
        }
    }
}

/// A required argument of a function that is not STRICT (because another
/// argument may be NULL): NULL is a user error (22023), never a panic.
pub fn not_null<T>(value: Option<T>, what: &str) -> T {
    match value {
        Some(v) => v,
        None => McError::bad_arg(format!("{what} must not be null")).raise(),
    }
}

/// Unwraps a result at the SQL boundary, raising the error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<McError>> OrRaise<T> for Result<T, E> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().raise(),
        }
    }
}

impl From<BadName> for McError {
    fn from(e: BadName) -> Self {
        McError::BadArgument {
            message: "invalid keyring name".into(),
            detail: Some(format!("the name given is {} bytes long", e.len)),
            hint: Some(
                "a keyring name is 1 to 63 characters: a lowercase letter, then lowercase \
                 letters, digits or underscores"
                    .into(),
            ),
        }
    }
}

impl From<pgrx::spi::Error> for McError {
    fn from(e: pgrx::spi::Error) -> Self {
        // SPI errors are ours (a query or a type mapping), never the user's.
        McError::Internal(format!("internal SPI error: {e}"))
    }
}
