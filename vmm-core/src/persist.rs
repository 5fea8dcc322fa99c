//! The one trait every piece of saved machine state goes through: a component turns itself into
//! a plain serde [`Persist::State`] and is rebuilt from one. The trait has no default methods, so
//! a component cannot silently save nothing; each implementation has a round-trip test
//! (save, restore into a fresh one, save again, compare).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A component whose state can be saved and restored.
pub trait Persist: Sized {
    /// The saved state: plain data, serializable, untrusted when read back (restore validates).
    type State: Serialize + DeserializeOwned;
    /// What restore needs besides the state: the host resources a new instance is built on
    /// (file descriptors, sockets, guest memory, the VM).
    type ConstructorArgs<'a>;
    /// Why saving or restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Captures the component's state.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds a component from `args` and a saved `state`.
    fn restore(args: Self::ConstructorArgs<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}
