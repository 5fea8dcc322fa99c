//! Per-user locations the XDG way: an explicit override, else `$XDG_*_HOME/thaw`, else
//! `~/<fallback>/thaw`. Shared by the host key and
//! `thaw`'s caches (the kernel, function images).

use std::ffi::OsString;
use std::path::PathBuf;

/// Where a location came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The override, as given.
    Explicit(PathBuf),
    /// Thaw's directory under the XDG base or the home fallback.
    Dir(PathBuf),
}

/// Resolves `explicit`, else `xdg`/thaw (ignored if relative, as the XDG spec says), else
/// `home`/`fallback`/thaw. Empty values count as unset.
pub fn resolve(
    explicit: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
    fallback: &str,
) -> Option<Resolved> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(explicit).map(Resolved::Explicit).or_else(|| {
        set(xdg)
            .filter(|p| p.is_absolute())
            .map(|p| p.join("thaw"))
            .or_else(|| set(home).map(|p| p.join(fallback).join("thaw")))
            .map(Resolved::Dir)
    })
}

/// Thaw's per-user state directory: `$XDG_STATE_HOME/thaw`, else `~/.local/state/thaw`; `None`
/// if neither says where. What a host keeps about the snapshots it restored lives here.
pub fn state_dir() -> Option<PathBuf> {
    let resolved = resolve(
        None,
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
        ".local/state",
    )?;
    match resolved {
        Resolved::Explicit(dir) | Resolved::Dir(dir) => Some(dir),
    }
}
