//! What the protect trigger does with one protected column of one row:
//! plain safe code over the value's class and the row's AAD, decided before
//! any key is touched. The table in README ("Protected columns") is this
//! function.

use manna_crypt_core::classify::Class;

/// The column's part of the row being written.
pub struct Write<'a> {
    /// The new value's shape.
    pub class: Class,
    /// For an UPDATE: whether the column's bytes are unchanged, and whether
    /// the AAD changed. `None` for an INSERT.
    pub update: Option<Update>,
    /// The new value is the ciphertext this statement's BEFORE INSERT
    /// trigger just produced under `aad` (an `INSERT ... ON CONFLICT DO
    /// UPDATE SET col = EXCLUDED.col` reaching another row).
    pub just_sealed_under: Option<&'a Option<String>>,
    /// The row's AAD now.
    pub aad: &'a Option<String>,
}

#[derive(Clone, Copy)]
pub struct Update {
    pub unchanged: bool,
    pub aad_changed: bool,
}

/// Where the AAD a ciphertext is bound to comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum From {
    /// The row before the UPDATE (its AAD column changed, the value not).
    OldRow,
    /// This statement's BEFORE INSERT trigger sealed it under this AAD.
    Sealed(Option<String>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Store the value as it is.
    Keep,
    /// Plaintext: encrypt it under the keyring with the row's AAD.
    Seal,
    /// A ciphertext bound to another AAD: decrypt with that one, seal
    /// again with the row's.
    Rebind(From),
    /// A ciphertext written by an UPDATE: it must decrypt under the row's
    /// AAD (39000 otherwise), so a value copied from another row never
    /// sits where it silently cannot be read.
    Verify,
    /// `mc1:` that does not parse: 22P02, never encrypted as plaintext
    /// (`col = col || 'x'`).
    Malformed,
}

pub fn decide(w: &Write<'_>) -> Action {
    match (w.class, w.update) {
        (Class::Malformed, _) => Action::Malformed,
        // An INSERT (COPY, a restore) keeps any well-formed ciphertext: the
        // key tables may not even be loaded yet in a data-only restore, and
        // values under revoked or destroyed keys must survive it.
        (Class::Mc1(_), None) => Action::Keep,
        (Class::Mc1(_), Some(u)) if u.unchanged => {
            if u.aad_changed {
                Action::Rebind(From::OldRow)
            } else {
                Action::Keep
            }
        }
        (Class::Mc1(_), Some(_)) => match w.just_sealed_under {
            Some(from) if from != w.aad => Action::Rebind(From::Sealed(from.clone())),
            Some(_) => Action::Keep,
            None => Action::Verify,
        },
        // Plaintext, and Fernet tokens, which a protected column stores
        // encrypted like any other text.
        (Class::Plaintext | Class::Fernet, _) => Action::Seal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w<'a>(
        class: Class,
        update: Option<(bool, bool)>,
        just: Option<&'a Option<String>>,
        aad: &'a Option<String>,
    ) -> Write<'a> {
        Write {
            class,
            update: update.map(|(unchanged, aad_changed)| Update {
                unchanged,
                aad_changed,
            }),
            just_sealed_under: just,
            aad,
        }
    }

    #[test]
    fn inserts() {
        let aad = Some("1".to_string());
        assert_eq!(decide(&w(Class::Plaintext, None, None, &aad)), Action::Seal);
        assert_eq!(decide(&w(Class::Fernet, None, None, &aad)), Action::Seal);
        assert_eq!(decide(&w(Class::Mc1(3), None, None, &aad)), Action::Keep);
        assert_eq!(
            decide(&w(Class::Malformed, None, None, &aad)),
            Action::Malformed
        );
    }

    #[test]
    fn updates() {
        let aad = Some("1".to_string());
        let other = Some("2".to_string());
        let mc1 = Class::Mc1(3);
        assert_eq!(
            decide(&w(mc1, Some((true, false)), None, &aad)),
            Action::Keep
        );
        assert_eq!(
            decide(&w(mc1, Some((true, true)), None, &aad)),
            Action::Rebind(From::OldRow)
        );
        assert_eq!(
            decide(&w(mc1, Some((false, false)), None, &aad)),
            Action::Verify
        );
        assert_eq!(
            decide(&w(mc1, Some((false, false)), Some(&other), &aad)),
            Action::Rebind(From::Sealed(other.clone()))
        );
        assert_eq!(
            decide(&w(mc1, Some((false, false)), Some(&aad), &aad)),
            Action::Keep
        );
        assert_eq!(
            decide(&w(Class::Plaintext, Some((false, true)), None, &aad)),
            Action::Seal
        );
        assert_eq!(
            decide(&w(Class::Malformed, Some((true, false)), None, &aad)),
            Action::Malformed
        );
    }
}
