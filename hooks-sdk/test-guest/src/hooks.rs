//! A tiny in-guest hook registry, in the spirit of Lambda SnapStart's runtime hooks: functions
//! run before a checkpoint (in reverse order of registration, as CRaC does) and after a restore
//! (in order of registration), plus the guest-side state the test guest's own hooks keep.

use hooks_sdk::protocol::Restored;
use sha2::{Digest, Sha256};

use crate::status::RestoreId;

/// Most hooks of each kind.
pub const MAX_HOOKS: usize = 4;

/// A before-checkpoint hook; an error message fails the checkpoint.
pub type BeforeCheckpoint<S> = fn(&mut S) -> Result<(), &'static str>;
/// An after-restore hook; it sees what the host sent with `Restored`.
pub type AfterRestore<S> = fn(&mut S, &Restored) -> Result<(), &'static str>;

/// Registered hooks over guest state `S`.
pub struct Hooks<S> {
    before: [Option<BeforeCheckpoint<S>>; MAX_HOOKS],
    after: [Option<AfterRestore<S>>; MAX_HOOKS],
}

impl<S> Default for Hooks<S> {
    fn default() -> Self {
        Hooks {
            before: [None; MAX_HOOKS],
            after: [None; MAX_HOOKS],
        }
    }
}

/// No room for another hook.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

fn add<F>(list: &mut [Option<F>], f: F) -> Result<(), Full> {
    let free = list.iter_mut().find(|h| h.is_none()).ok_or(Full)?;
    *free = Some(f);
    Ok(())
}

impl<S> Hooks<S> {
    /// Registers a before-checkpoint hook.
    pub fn before_checkpoint(&mut self, f: BeforeCheckpoint<S>) -> Result<(), Full> {
        add(&mut self.before, f)
    }

    /// Registers an after-restore hook.
    pub fn after_restore(&mut self, f: AfterRestore<S>) -> Result<(), Full> {
        add(&mut self.after, f)
    }

    /// Runs the before-checkpoint hooks, last registered first; stops at the first failure.
    /// Returns how many ran.
    pub fn run_before_checkpoint(&self, state: &mut S) -> Result<usize, &'static str> {
        let mut ran = 0;
        for f in self.before.iter().rev().flatten() {
            f(state)?;
            ran += 1;
        }
        Ok(ran)
    }

    /// Runs the after-restore hooks in registration order; stops at the first failure.
    pub fn run_after_restore(&self, state: &mut S, r: &Restored) -> Result<usize, &'static str> {
        let mut ran = 0;
        for f in self.after.iter().flatten() {
            f(state, r)?;
            ran += 1;
        }
        Ok(ran)
    }
}

/// What the test guest's hooks maintain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    /// Checkpoints prepared.
    pub checkpoints: u32,
    /// The marker the last before-checkpoint hook recorded.
    pub marker: u64,
    /// Restores handled.
    pub restores: u32,
    /// The guest's random state; every restore mixes the host's entropy into it. Before the
    /// first restore it is only as good as its boot seed, which for this guest is all zeros:
    /// every boot draws the same values, and so does every clone of a snapshot until its
    /// `Restored` entropy is mixed in.
    pub rng: [u8; 32],
    /// Values drawn from `rng` so far (see [`GuestState::draw`]).
    pub draws: u64,
    /// The host's wall clock at the last restore, Unix nanoseconds.
    pub wall_clock_ns: u64,
    /// The last restore's id (empty before any).
    pub restore_id: RestoreId,
}

impl GuestState {
    /// Records a checkpoint: bumps the counter and derives a marker from the state.
    pub fn checkpoint(&mut self) {
        self.checkpoints += 1;
        let mut h = Sha256::new();
        h.update(self.rng);
        h.update(self.checkpoints.to_le_bytes());
        let d: [u8; 32] = h.finalize().into();
        let mut m = [0u8; 8];
        m.copy_from_slice(&d[..8]);
        self.marker = u64::from_le_bytes(m);
    }

    /// Mixes a restore into the state: rng = SHA-256(rng, entropy, restore id, wall clock).
    pub fn restore(&mut self, r: &Restored) {
        self.restores += 1;
        let mut h = Sha256::new();
        h.update(self.rng);
        h.update((r.entropy.len() as u32).to_le_bytes());
        h.update(r.entropy);
        h.update((r.restore_id.len() as u32).to_le_bytes());
        h.update(r.restore_id.as_bytes());
        h.update(r.wall_clock_ns.to_le_bytes());
        self.rng = h.finalize().into();
        self.wall_clock_ns = r.wall_clock_ns;
        self.restore_id.set(r.restore_id);
    }

    /// Draws 16 random bytes: SHA-256(rng, draw number), so the state itself never leaves the
    /// guest and successive draws differ.
    pub fn draw(&mut self) -> [u8; 16] {
        self.draws += 1;
        let mut h = Sha256::new();
        h.update(self.rng);
        h.update(self.draws.to_le_bytes());
        let d: [u8; 32] = h.finalize().into();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored(entropy: &[u8]) -> Restored<'_> {
        Restored {
            entropy,
            wall_clock_ns: 1_795_000_000_000_000_000,
            restore_id: "r-1",
        }
    }

    #[test]
    fn hooks_run_in_crac_order_and_stop_at_failure() {
        let mut hooks = Hooks::<Vec<u32>>::default();
        hooks
            .before_checkpoint(|s| {
                s.push(1);
                Ok(())
            })
            .unwrap();
        hooks
            .before_checkpoint(|s| {
                s.push(2);
                Ok(())
            })
            .unwrap();
        hooks
            .after_restore(|s, _| {
                s.push(10);
                Ok(())
            })
            .unwrap();
        hooks.after_restore(|_, _| Err("boom")).unwrap();
        hooks
            .after_restore(|s, _| {
                s.push(30);
                Ok(())
            })
            .unwrap();
        let mut log = Vec::new();
        assert_eq!(hooks.run_before_checkpoint(&mut log), Ok(2));
        assert_eq!(log, [2, 1]);
        assert_eq!(
            hooks.run_after_restore(&mut log, &restored(&[0; 32])),
            Err("boom")
        );
        assert_eq!(log, [2, 1, 10]);
        hooks.after_restore(|_, _| Ok(())).unwrap();
        assert_eq!(hooks.after_restore(|_, _| Ok(())), Err(Full));
    }

    #[test]
    fn restores_diverge_with_their_entropy() {
        let mut a = GuestState::default();
        a.checkpoint();
        let marker = a.marker;
        assert_ne!(marker, 0);
        let mut b = a;
        a.restore(&restored(&[1; 32]));
        b.restore(&restored(&[2; 32]));
        assert_ne!(a.rng, b.rng);
        assert_eq!(
            (a.restores, a.wall_clock_ns),
            (1, 1_795_000_000_000_000_000)
        );
        let mut c = GuestState {
            marker,
            checkpoints: 1,
            ..Default::default()
        };
        c.restore(&restored(&[1; 32]));
        assert_eq!(c.rng, a.rng, "the same inputs give the same state");
        assert_eq!(a.restore_id.as_str(), "r-1");
    }

    #[test]
    fn draws_advance_and_clones_draw_apart_after_their_restores() {
        let mut a = GuestState::default();
        let (first, second) = (a.draw(), a.draw());
        assert_ne!(first, second);
        assert_eq!(a.draws, 2);
        let mut b = a;
        assert_eq!(
            a.draw(),
            b.draw(),
            "a clone repeats its parent until restored"
        );
        a.restore(&restored(&[1; 32]));
        b.restore(&restored(&[2; 32]));
        let (x, y) = (a.draw(), b.draw());
        assert_ne!(x, y);
        assert!(!a.rng.starts_with(&x), "a draw is not the state itself");
    }
}
