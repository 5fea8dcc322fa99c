//! The image's `/init`: the static `thaw-init` (hooks-sdk), found from `--thaw-init`, else
//! `$THAW_INIT`, else beside the running `thaw`. It must be a static x86-64 ELF: the image
//! carries a dynamic loader only for Python, and the kernel starts `/init` before anything could
//! fix a missing one, so a dynamic build would fail at boot with nothing but a kernel panic.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};

/// The variable naming a `thaw-init` when `--thaw-init` is not given.
pub const THAW_INIT_ENV: &str = "THAW_INIT";
/// The file name looked for beside the `thaw` executable.
pub const THAW_INIT_NAME: &str = "thaw-init";

/// How to get a static `thaw-init`, for error messages.
const HOW_TO_BUILD: &str = "build one with scripts/build-thaw-init (it prints the path of a \
                            static build) and pass it with --thaw-init PATH or THAW_INIT=PATH";

/// No usable `thaw-init`.
#[derive(Debug, thiserror::Error)]
pub enum ThawInitError {
    /// None given, and none beside `thaw`.
    #[error(
        "no thaw-init: none given with --thaw-init or ${THAW_INIT_ENV}, and {looked} does not exist; {HOW_TO_BUILD}"
    )]
    NotFound {
        /// Where it was looked for.
        looked: String,
    },
    /// The file named cannot be read.
    #[error("cannot read thaw-init {} (from {source_name})", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Where the path came from.
        source_name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a static x86-64 ELF executable.
    #[error("thaw-init {} (from {source_name}) {reason}; {HOW_TO_BUILD}", path.display())]
    NotStatic {
        /// The file.
        path: PathBuf,
        /// Where the path came from.
        source_name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Finds and checks `thaw-init`: `flag`, else `$THAW_INIT`, else `thaw-init` beside the running
/// executable.
pub fn locate(flag: Option<&Path>) -> Result<PathBuf, ThawInitError> {
    locate_in(
        flag,
        std::env::var_os(THAW_INIT_ENV),
        std::env::current_exe().ok(),
    )
}

/// [`locate`] with its inputs given.
pub fn locate_in(
    flag: Option<&Path>,
    env: Option<OsString>,
    current_exe: Option<PathBuf>,
) -> Result<PathBuf, ThawInitError> {
    let (path, source_name) = match (flag, env) {
        (Some(path), _) => (path.to_owned(), "--thaw-init"),
        (None, Some(env)) if !env.is_empty() => (PathBuf::from(env), "$THAW_INIT"),
        _ => {
            let beside = current_exe
                .as_deref()
                .and_then(Path::parent)
                .map(|dir| dir.join(THAW_INIT_NAME));
            match beside {
                Some(path) if path.exists() => (path, "beside the thaw executable"),
                Some(path) => {
                    return Err(ThawInitError::NotFound {
                        looked: path.display().to_string(),
                    });
                }
                None => {
                    return Err(ThawInitError::NotFound {
                        looked: "the thaw executable's directory (unknown)".into(),
                    });
                }
            }
        }
    };
    let data = std::fs::read(&path).map_err(|source| ThawInitError::Read {
        path: path.clone(),
        source_name,
        source,
    })?;
    check_static(&data).map_err(|reason| ThawInitError::NotStatic {
        path: path.clone(),
        source_name,
        reason,
    })?;
    Ok(path)
}

/// Whether `data` is a static x86-64 ELF executable: ELF64, x86-64, an executable or a
/// static PIE, and no `PT_INTERP`.
pub fn check_static(data: &[u8]) -> Result<(), String> {
    let file = ElfFile64::<object::Endianness>::parse(data)
        .map_err(|e| format!("is not an x86-64 ELF64 file ({e})"))?;
    let endian = file.endian();
    let header = file.elf_header();
    let machine = header.e_machine(endian);
    if machine != object::elf::EM_X86_64 {
        return Err(format!("is built for machine {machine}, not x86-64"));
    }
    let kind = header.e_type(endian);
    if kind != object::elf::ET_EXEC && kind != object::elf::ET_DYN {
        return Err(format!("is not an executable (ELF type {kind})"));
    }
    for segment in file.elf_program_headers() {
        if let Ok(Some(interp)) = segment.interpreter(endian, data) {
            return Err(format!(
                "is dynamically linked (it asks for {}), but /init must be static",
                String::from_utf8_lossy(interp)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::function_image::test_elf::{TinyElf, write_elf};

    #[test]
    fn static_x86_64_is_accepted_and_the_rest_refused() {
        assert!(check_static(&TinyElf::default().build()).is_ok());
        let dynamic = TinyElf {
            interp: Some("/lib64/ld-linux-x86-64.so.2"),
            ..TinyElf::default()
        }
        .build();
        assert!(
            check_static(&dynamic)
                .unwrap_err()
                .contains("dynamically linked")
        );
        let arm = TinyElf {
            machine: object::elf::EM_AARCH64,
            ..TinyElf::default()
        }
        .build();
        assert!(check_static(&arm).unwrap_err().contains("not x86-64"));
        let mut elf32 = TinyElf::default().build();
        elf32[4] = 1; // ELFCLASS32
        assert!(check_static(&elf32).is_err());
        assert!(check_static(b"#!/bin/sh\nexec true\n").is_err());
    }

    #[test]
    fn the_flag_wins_then_the_variable_then_the_executables_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["flag", "env", "thaw-init"] {
            write_elf(&d.join(name), &TinyElf::default());
        }
        let exe = Some(d.join("thaw"));
        let flag = d.join("flag");
        assert_eq!(
            locate_in(Some(&flag), Some("x".into()), exe.clone()).unwrap(),
            flag
        );
        assert_eq!(
            locate_in(None, Some(d.join("env").into()), exe.clone()).unwrap(),
            d.join("env")
        );
        assert_eq!(
            locate_in(None, Some("".into()), exe.clone()).unwrap(),
            d.join("thaw-init")
        );
        assert_eq!(locate_in(None, None, exe).unwrap(), d.join("thaw-init"));
    }

    #[test]
    fn missing_or_dynamic_thaw_init_says_how_to_build_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = locate_in(None, None, Some(d.join("thaw"))).unwrap_err();
        assert!(matches!(err, ThawInitError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("scripts/build-thaw-init"), "{err}");

        let err = locate_in(Some(&d.join("missing")), None, None).unwrap_err();
        assert!(matches!(err, ThawInitError::Read { .. }), "{err}");

        write_elf(
            &d.join("dynamic"),
            &TinyElf {
                interp: Some("/lib64/ld-linux-x86-64.so.2"),
                ..TinyElf::default()
            },
        );
        let err = locate_in(None, Some(d.join("dynamic").into()), None).unwrap_err();
        assert!(matches!(err, ThawInitError::NotStatic { .. }), "{err}");
        assert!(err.to_string().contains("$THAW_INIT"), "{err}");
    }
}
