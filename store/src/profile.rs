//! AWS's shared config and credentials files, read as AWS's CLI and SDKs read them, for what
//! the environment does not say: the profile is `AWS_PROFILE` (else `default`); its credentials
//! come from `AWS_SHARED_CREDENTIALS_FILE` (else `~/.aws/credentials`), section `[NAME]`, then
//! from `AWS_CONFIG_FILE` (else `~/.aws/config`), section `[profile NAME]` (`[default]` for the
//! default profile), which also gives `region` and `endpoint_url`.
//!
//! Only static keys are read (`aws_access_key_id`, `aws_secret_access_key`,
//! `aws_session_token`); a profile that gets them another way (SSO, `credential_process`, an
//! assumed role) is not followed, and the environment or the instance's role must supply them.
//! A missing file, or a missing `default` profile, is not an error; a profile named in
//! `AWS_PROFILE` that neither file has is.

use std::io::Read;
use std::path::{Path, PathBuf};

use ini::{Ini, ParseOption};

use crate::Secret;

/// A file larger than this is refused unread.
const MAX_FILE_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read AWS profile file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("AWS profile file {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("AWS_PROFILE is {name:?}, and neither {} nor {} has that profile", credentials.display(), config.display())]
    NoSuchProfile {
        name: String,
        credentials: PathBuf,
        config: PathBuf,
    },
    #[error("AWS profile {name:?} has {has} but not {lacks}")]
    HalfCredentials {
        name: String,
        has: &'static str,
        lacks: &'static str,
    },
}

/// What a profile says; `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

/// The profile the environment (`var`) selects, from the files it names (or the ones in
/// `$HOME/.aws`).
pub fn load(var: impl Fn(&str) -> Option<String>) -> Result<Profile, ProfileError> {
    let home = var("HOME").map(PathBuf::from);
    let file = |env: &str, default: &str| {
        var(env)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let credentials_path = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let config_path = file("AWS_CONFIG_FILE", "config");
    let named = var("AWS_PROFILE").filter(|n| !n.is_empty());
    let name = named.clone().unwrap_or_else(|| "default".into());

    let credentials = read(credentials_path.as_deref())?;
    let config = read(config_path.as_deref())?;
    let from_credentials = credentials
        .as_ref()
        .and_then(|ini| ini.section(Some(name.as_str())));
    let from_config = config.as_ref().and_then(|ini| {
        ini.section(Some(format!("profile {name}"))).or_else(|| {
            (name == "default")
                .then(|| ini.section(Some("default")))
                .flatten()
        })
    });
    if from_credentials.is_none() && from_config.is_none() {
        if let Some(name) = named {
            return Err(ProfileError::NoSuchProfile {
                name,
                credentials: credentials_path.unwrap_or_default(),
                config: config_path.unwrap_or_default(),
            });
        }
        return Ok(Profile::default());
    }
    // The credentials file wins over the config file for keys, as AWS's tools have it.
    let get = |key: &str| {
        from_credentials
            .and_then(|s| s.get(key))
            .or_else(|| from_config.and_then(|s| s.get(key)))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let profile = Profile {
        region: from_config
            .and_then(|s| s.get("region"))
            .map(|r| r.trim().to_owned()),
        endpoint_url: from_config
            .and_then(|s| s.get("endpoint_url"))
            .map(|e| e.trim().to_owned()),
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key").map(Secret),
        session_token: get("aws_session_token").map(Secret),
    };
    match (&profile.access_key_id, &profile.secret_access_key) {
        (Some(_), None) => Err(ProfileError::HalfCredentials {
            name,
            has: "aws_access_key_id",
            lacks: "aws_secret_access_key",
        }),
        (None, Some(_)) => Err(ProfileError::HalfCredentials {
            name,
            has: "aws_secret_access_key",
            lacks: "aws_access_key_id",
        }),
        _ => Ok(profile),
    }
}

/// The file at `path` parsed, or `None` if there is none.
fn read(path: Option<&Path>) -> Result<Option<Ini>, ProfileError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let failed = |source| ProfileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match snapshot::open_regular(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(e)),
    };
    let mut text = String::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > MAX_FILE_LEN {
        return Err(failed(std::io::Error::other(format!(
            "larger than {} KiB",
            MAX_FILE_LEN >> 10
        ))));
    }
    // As AWS's parser: no quoting and no escapes (a secret may hold a backslash), and an
    // indented line continues the key above it (a nested block such as `s3 =`).
    let options = ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        enabled_indented_mutiline_value: true,
        ..ParseOption::default()
    };
    Ini::load_from_str_opt(&text, options)
        .map(Some)
        .map_err(|e| ProfileError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &Path)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const CREDENTIALS: &str = "\
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = se/cr\\et+default

[ci]
aws_access_key_id=AKIDCI
aws_secret_access_key=secretci
aws_session_token=tokenci
";

    const CONFIG: &str = "\
# a comment
[default]
region = eu-west-3

[profile ci]
region = us-east-2
endpoint_url = http://127.0.0.1:9000
s3 =
  addressing_style = path

[profile half]
aws_access_key_id = AKIDHALF
";

    fn files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), CREDENTIALS).unwrap();
        std::fs::write(dir.path().join(".aws/config"), CONFIG).unwrap();
        dir
    }

    #[test]
    fn the_default_profile_comes_from_home() {
        let dir = files();
        let p = load(env(&[("HOME", dir.path())])).unwrap();
        assert_eq!(p.region.as_deref(), Some("eu-west-3"));
        assert_eq!(p.access_key_id.as_deref(), Some("AKIDDEFAULT"));
        // Taken as written: no escapes.
        assert_eq!(
            p.secret_access_key,
            Some(Secret("se/cr\\et+default".into()))
        );
        assert_eq!((p.endpoint_url, p.session_token), (None, None));
    }

    #[test]
    fn aws_profile_picks_a_named_profile_and_the_files_can_be_moved() {
        let dir = files();
        let elsewhere = tempfile::tempdir().unwrap();
        let (creds, config) = (elsewhere.path().join("c"), elsewhere.path().join("k"));
        std::fs::rename(dir.path().join(".aws/credentials"), &creds).unwrap();
        std::fs::rename(dir.path().join(".aws/config"), &config).unwrap();
        let p = load(env(&[
            ("HOME", dir.path()),
            ("AWS_PROFILE", Path::new("ci")),
            ("AWS_SHARED_CREDENTIALS_FILE", &creds),
            ("AWS_CONFIG_FILE", &config),
        ]))
        .unwrap();
        assert_eq!(p.region.as_deref(), Some("us-east-2"));
        assert_eq!(p.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(p.access_key_id.as_deref(), Some("AKIDCI"));
        assert_eq!(p.session_token, Some(Secret("tokenci".into())));
    }

    #[test]
    fn no_files_is_no_profile_but_a_named_profile_must_exist() {
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            load(env(&[("HOME", empty.path())])).unwrap(),
            Profile::default()
        );
        assert_eq!(load(|_| None).unwrap(), Profile::default());
        let err = load(env(&[
            ("HOME", empty.path()),
            ("AWS_PROFILE", Path::new("prod")),
        ]))
        .unwrap_err();
        assert!(matches!(err, ProfileError::NoSuchProfile { .. }), "{err}");
    }

    #[test]
    fn bad_files_are_refused_with_the_path() {
        let dir = files();
        let half = load(env(&[
            ("HOME", dir.path()),
            ("AWS_PROFILE", Path::new("half")),
        ]))
        .unwrap_err();
        assert!(
            matches!(half, ProfileError::HalfCredentials { .. }),
            "{half}"
        );

        let config = dir.path().join(".aws/config");
        std::fs::write(&config, "[profile ci\nregion = x\n").unwrap();
        let err = load(env(&[("HOME", dir.path())])).unwrap_err();
        assert!(matches!(err, ProfileError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("config"), "{err}");

        std::fs::remove_file(&config).unwrap();
        std::fs::create_dir(&config).unwrap();
        let err = load(env(&[("HOME", dir.path())])).unwrap_err();
        assert!(matches!(err, ProfileError::Read { .. }), "{err}");
    }
}
