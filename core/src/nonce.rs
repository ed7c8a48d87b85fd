//! 96-bit nonces from a per-process CSPRNG.
//!
//! Every encryption draws a fresh random 96-bit nonce (docs/DESIGN.md section 1).
//! Asking the kernel for 12 bytes per row costs a system call per row, so
//! each process keeps a ChaCha20 generator seeded from the OS CSPRNG.
//!
//! PostgreSQL forks every backend from the postmaster. If the generator were
//! seeded in the postmaster (the library can be preloaded) every child would
//! inherit the same state and emit the same nonces — catastrophic for GCM.
//! So the generator remembers the process id it was seeded in and reseeds
//! whenever it finds itself in a different process. It also reseeds after a
//! bounded number of outputs, so a memory disclosure exposes few nonces.

use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};

/// The envelope's nonce length: one constant for the format and its source.
pub use crate::envelope::NONCE_LEN;

/// Outputs drawn between two reseeds from the kernel.
const RESEED_EVERY: u32 = 1 << 20;

pub struct NonceSource {
    rng: Option<(u32, ChaCha20Rng)>,
    drawn: u32,
}

impl NonceSource {
    pub const fn new() -> Self {
        NonceSource {
            rng: None,
            drawn: 0,
        }
    }

    pub fn draw(&mut self) -> [u8; NONCE_LEN] {
        self.draw_in(std::process::id())
    }

    /// Like [`draw`](Self::draw), with the current process id supplied by
    /// the caller. `getpid()` is a system call; PostgreSQL already keeps the
    /// backend's pid in a global (`MyProcPid`), so the extension passes that.
    pub fn draw_in(&mut self, pid: u32) -> [u8; NONCE_LEN] {
        let fresh = match &self.rng {
            Some((seeded_in, _)) => *seeded_in != pid || self.drawn >= RESEED_EVERY,
            None => true,
        };
        if fresh {
            self.rng = Some((
                pid,
                ChaCha20Rng::from_rng(OsRng).expect("the OS CSPRNG is unavailable"),
            ));
            self.drawn = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        if let Some((_, rng)) = self.rng.as_mut() {
            rng.fill_bytes(&mut nonce);
        }
        self.drawn += 1;
        nonce
    }
}

impl Default for NonceSource {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn nonces_do_not_repeat() {
        let mut src = NonceSource::new();
        let seen: HashSet<[u8; 12]> = (0..100_000).map(|_| src.draw()).collect();
        assert_eq!(seen.len(), 100_000);
    }

    #[test]
    fn two_sources_differ() {
        assert_ne!(NonceSource::new().draw(), NonceSource::new().draw());
    }

    #[test]
    fn reseeds_after_the_bound() {
        let mut src = NonceSource::new();
        src.draw();
        src.drawn = RESEED_EVERY;
        src.draw();
        assert_eq!(src.drawn, 1);
    }

    #[test]
    fn reseeds_in_another_process() {
        let mut src = NonceSource::new();
        src.draw();
        // Pretend the state was inherited from a parent process.
        if let Some((pid, _)) = src.rng.as_mut() {
            *pid = pid.wrapping_add(1);
        }
        src.draw();
        assert_eq!(src.rng.as_ref().unwrap().0, std::process::id());
        assert_eq!(src.drawn, 1);
    }
}
