//! Identifiers: the user and run id types shared across actors, and random ids for runs and
//! sessions (unguessable, so knowing one run id tells nothing about another).

use std::sync::Arc;

use rand::Rng;

/// A user id: the `sub` of a verified token.
pub type UserId = Arc<str>;
/// A run id, unique server-wide.
pub type RunId = Arc<str>;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `prefix` followed by `len` random base62 characters.
pub fn random_id(prefix: &str, len: usize) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    id
}

/// A new run id: `run_` and 22 base62 characters (about 131 random bits).
pub fn new_run_id() -> RunId {
    random_id("run_", 22).into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_ids_have_their_shape_and_differ() {
        let a = super::new_run_id();
        let b = super::new_run_id();
        assert_eq!(a.len(), 26);
        assert!(a.starts_with("run_") && a[4..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
