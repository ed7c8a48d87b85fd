//! Return types that need more than pgrx's defaults.
//!
//! - [`EncryptedText`] is a `String` that PostgreSQL sees as the
//!   `manna_crypt.encrypted_text` domain, so `encrypt_gcm` returns the domain.
//! - [`SecretText`] and [`SecretBytes`] hold decrypted plaintext: they copy it
//!   into a PostgreSQL datum and then wipe the Rust buffer. (The datum itself
//!   is PostgreSQL's to manage, as with any value a query returns.)

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;
use zeroize::Zeroizing;

pub struct EncryptedText(pub String);

impl_sql_translatable!(EncryptedText, "manna_crypt.encrypted_text");

// SAFETY: the datum is a freshly palloc'd text varlena made by pgrx's `&str`
// conversion, returned straight to the caller of the function.
unsafe impl BoxRet for EncryptedText {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.0.as_str().into_datum() {
            Some(d) => unsafe { fcinfo.return_raw_datum(d) },
            None => fcinfo.return_null(),
        }
    }
}

/// Whether bytes can be a PostgreSQL `text` value: UTF-8 without NUL (a
/// NUL would silently truncate the value).
pub fn is_text(bytes: &[u8]) -> bool {
    !bytes.contains(&0) && std::str::from_utf8(bytes).is_ok()
}

/// Decrypted UTF-8 plaintext, wiped on drop.
pub struct SecretText(pub Zeroizing<Vec<u8>>);

impl_sql_translatable!(SecretText, "text");

// SAFETY: as for EncryptedText; the bytes were checked to be UTF-8 when the
// value was built (see `SecretText::from_utf8`).
unsafe impl BoxRet for SecretText {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        // SAFETY: validated in `from_utf8`, the only constructor used.
        let s = unsafe { std::str::from_utf8_unchecked(&self.0) };
        match s.into_datum() {
            Some(d) => unsafe { fcinfo.return_raw_datum(d) },
            None => fcinfo.return_null(),
        }
    }
}

impl SecretText {
    /// `None` when the bytes cannot be text: not UTF-8 (a bytea encrypted
    /// and then read back as text) or containing NUL.
    pub fn from_utf8(bytes: Zeroizing<Vec<u8>>) -> Option<Self> {
        is_text(&bytes).then_some(SecretText(bytes))
    }
}

/// Decrypted binary plaintext, wiped on drop.
pub struct SecretBytes(pub Zeroizing<Vec<u8>>);

impl_sql_translatable!(SecretBytes, "bytea");

// SAFETY: a freshly palloc'd bytea varlena from pgrx's `&[u8]` conversion.
unsafe impl BoxRet for SecretBytes {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match (&self.0[..]).into_datum() {
            Some(d) => unsafe { fcinfo.return_raw_datum(d) },
            None => fcinfo.return_null(),
        }
    }
}

/// A `regclass` argument as a plain OID. pgrx's `PgRelation` opens and locks
/// the relation while it converts the argument, so an OID of a dropped table
/// (`CALL encrypt_column(16384, ...)`) failed with XX000 "could not open
/// relation" before our code could say 42P01. The SQL type stays `regclass`
/// and the datum is the same OID, so existing catalogs call it unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regclass(pub pg_sys::Oid);

impl_sql_translatable!(Regclass, "regclass");

impl FromDatum for Regclass {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: a regclass datum is an OID passed by value.
        (!is_null)
            .then(|| Regclass(unsafe { pg_sys::Oid::from_datum(datum, false) }.unwrap_or_default()))
    }
}

impl IntoDatum for Regclass {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::REGCLASSOID
    }
}

// SAFETY: unboxes through `FromDatum` above, as pgrx does for `pg_sys::Oid`.
unsafe impl<'fcx> ArgAbi<'fcx> for Regclass {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        // SAFETY: the caller guarantees a non-null regclass argument.
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or(Regclass(pg_sys::InvalidOid))
    }
}

/// A `regrole` argument as a plain OID, like [`Regclass`]: the input
/// function has already refused a name of no role (42704).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regrole(pub pg_sys::Oid);

impl_sql_translatable!(Regrole, "regrole");

impl FromDatum for Regrole {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: a regrole datum is an OID passed by value.
        (!is_null)
            .then(|| Regrole(unsafe { pg_sys::Oid::from_datum(datum, false) }.unwrap_or_default()))
    }
}

impl IntoDatum for Regrole {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::REGROLEOID
    }
}

// SAFETY: unboxes through `FromDatum` above, as for `Regclass`.
unsafe impl<'fcx> ArgAbi<'fcx> for Regrole {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        // SAFETY: the caller guarantees a non-null regrole argument.
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or(Regrole(pg_sys::InvalidOid))
    }
}
