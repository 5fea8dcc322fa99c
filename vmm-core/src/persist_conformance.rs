//! The conformance check every [`Persist`] implementation in this crate passes, written once.
//!
//! [`check`] takes a component and a way to get the host resources of a fresh one, and checks
//! what must hold for any saved state: saving twice without a change gives the same bytes; the
//! state goes through the snapshot's own state-blob encoding (`snapshot::state_blob`: bincode,
//! little-endian, fixed-width integers) and decodes to the same bytes; a fresh instance restored
//! from it saves exactly those bytes again; no proper prefix of the encoding decodes and no
//! trailing byte is accepted. A [`Spec`] adds each implementation's particulars: the fields that
//! move by themselves (a clock), valid edits a restored instance must carry (these catch a field
//! that save or restore drops while the component under test happens to hold its default), and
//! invalid edits restore must refuse (for types that validate).
//!
//! Each implementation calls [`check`] from its own tests, with the turbofish
//! (`persist_conformance::check::<Type>`); `every_persist_impl_has_a_conformance_case` fails when
//! an `impl Persist for` in this crate has no such call.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::persist::Persist;

/// An edit of a saved state, with what it does (for failure messages).
type Edit<S> = (&'static str, fn(&mut S));

/// What [`check`] needs to know about one implementation besides the trait.
pub(crate) struct Spec<S> {
    volatile: fn(&mut S),
    carried: Vec<Edit<S>>,
    refused: Vec<Edit<S>>,
}

impl<S> Spec<S> {
    /// The spec for `P`, with no volatile fields and no edits yet: the plain round trip.
    // `P` is there to name the implementation: its `State` is `S`, which the edits' closures
    // then need not spell out.
    #[allow(clippy::extra_unused_type_parameters)]
    pub fn of<P: Persist<State = S>>() -> Self {
        Self {
            volatile: |_| {},
            carried: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// Masks the fields that move by themselves between two saves of an unchanged component
    /// (clocks), before any comparison. The caller says why for each field it masks.
    pub fn volatile(mut self, mask: fn(&mut S)) -> Self {
        self.volatile = mask;
        self
    }

    /// A valid edit that a restored component must carry: restored from the edited state, it
    /// saves the edited state again.
    pub fn carries(mut self, what: &'static str, edit: fn(&mut S)) -> Self {
        self.carried.push((what, edit));
        self
    }

    /// An edit that makes the state invalid: restore must refuse it.
    pub fn refuses(mut self, what: &'static str, edit: fn(&mut S)) -> Self {
        self.refused.push((what, edit));
        self
    }
}

/// The snapshot's state-blob encoding of `value`.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    snapshot::state_blob::encode(value).expect("a saved state always encodes")
}

/// Decodes a state-blob encoding that must be valid.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> T {
    snapshot::state_blob::decode(bytes).expect("a state this build encoded decodes")
}

/// Where two encodings first differ, for failure messages.
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> String {
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let window = |s: &[u8]| {
        let start = at.saturating_sub(8);
        format!("{:02x?}", &s[start.min(s.len())..(at + 8).min(s.len())])
    };
    format!(
        "{} vs {} bytes, first difference at byte {at} ({:#x}): ...{} vs ...{}",
        a.len(),
        b.len(),
        at,
        window(a),
        window(b)
    )
}

/// Runs the conformance check on `component`; `fresh` gives the host resources of a new
/// instance each time it is called (a restore consumes them). Returns the state saved first,
/// unmasked, for the caller's own assertions.
pub(crate) fn check<'a, P: Persist>(
    component: &P,
    mut fresh: impl FnMut() -> P::ConstructorArgs<'a>,
    spec: &Spec<P::State>,
) -> P::State {
    let name = std::any::type_name::<P>();
    let save = |p: &P, when: &str| {
        p.save()
            .unwrap_or_else(|e| panic!("{name}: save ({when}) failed: {e}"))
    };
    let masked = |state: &P::State| {
        let mut copy: P::State = decode(&encode(state));
        (spec.volatile)(&mut copy);
        encode(&copy)
    };

    let saved = save(component, "first");
    let bytes = masked(&saved);
    let twice = masked(&save(component, "second"));
    assert!(
        twice == bytes,
        "{name}: saving twice without a change gives other bytes: {}",
        first_difference(&bytes, &twice)
    );

    let encoded = encode(&saved);
    let decoded: P::State = decode(&encoded);
    assert!(
        encode(&decoded) == encoded,
        "{name}: decoding and encoding again changes the state: {}",
        first_difference(&encoded, &encode(&decoded))
    );
    let mut cuts = vec![0, encoded.len() / 2, encoded.len().saturating_sub(1)];
    cuts.dedup();
    for cut in cuts.into_iter().filter(|&c| c < encoded.len()) {
        assert!(
            snapshot::state_blob::decode::<P::State>(&encoded[..cut]).is_err(),
            "{name}: the first {cut} of {} bytes decode as a whole state",
            encoded.len()
        );
    }
    let mut longer = encoded.clone();
    longer.push(0);
    assert!(
        snapshot::state_blob::decode::<P::State>(&longer).is_err(),
        "{name}: a state with a trailing byte decodes"
    );

    let restored = P::restore(fresh(), &decoded)
        .unwrap_or_else(|e| panic!("{name}: restoring its own saved state failed: {e}"));
    let again = masked(&save(&restored, "after restore"));
    assert!(
        again == bytes,
        "{name}: restore then save does not give the saved bytes back: {}",
        first_difference(&bytes, &again)
    );

    for (what, edit) in &spec.carried {
        let mut edited: P::State = decode(&encoded);
        edit(&mut edited);
        let expected = masked(&edited);
        assert!(
            expected != bytes,
            "{name}: the edit '{what}' changes nothing"
        );
        let restored = P::restore(fresh(), &edited)
            .unwrap_or_else(|e| panic!("{name}: restore refused the valid edit '{what}': {e}"));
        let got = masked(&save(&restored, what));
        assert!(
            got == expected,
            "{name}: the edit '{what}' is lost through restore and save: {}",
            first_difference(&expected, &got)
        );
    }
    for (what, edit) in &spec.refused {
        let mut bad: P::State = decode(&encoded);
        edit(&mut bad);
        assert!(
            P::restore(fresh(), &bad).is_err(),
            "{name}: restore accepted an invalid state ({what})"
        );
    }
    saved
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use serde::Deserialize;

    use super::*;

    /// A component that can be told to get one thing wrong.
    #[derive(Clone, Copy, PartialEq)]
    enum Flaw {
        None,
        SaveDropsB,
        RestoreSkipsCheck,
    }

    struct Toy {
        a: u32,
        b: u8,
        flaw: Flaw,
    }

    #[derive(Serialize, Deserialize)]
    struct ToyState {
        a: u32,
        b: u8,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("b must be below 100")]
    struct ToyError;

    impl Persist for Toy {
        type State = ToyState;
        type ConstructorArgs<'a> = Flaw;
        type Error = ToyError;

        fn save(&self) -> Result<ToyState, ToyError> {
            let b = if self.flaw == Flaw::SaveDropsB {
                0
            } else {
                self.b
            };
            Ok(ToyState { a: self.a, b })
        }

        fn restore(flaw: Flaw, state: &ToyState) -> Result<Self, ToyError> {
            if state.b >= 100 && flaw != Flaw::RestoreSkipsCheck {
                return Err(ToyError);
            }
            Ok(Toy {
                a: state.a,
                b: state.b,
                flaw,
            })
        }
    }

    fn spec() -> Spec<ToyState> {
        Spec::of::<Toy>()
            .carries("b = 7", |s| s.b = 7)
            .refuses("b = 100", |s| s.b = 100)
    }

    fn toy(flaw: Flaw) -> Toy {
        Toy { a: 5, b: 0, flaw }
    }

    #[test]
    fn a_faithful_component_passes() {
        let saved =
            crate::persist_conformance::check::<Toy>(&toy(Flaw::None), || Flaw::None, &spec());
        assert_eq!(saved.a, 5);
    }

    #[test]
    #[should_panic(expected = "the edit 'b = 7' is lost through restore and save")]
    fn a_field_that_save_drops_fails_even_when_it_holds_its_default() {
        let flaw = Flaw::SaveDropsB;
        crate::persist_conformance::check::<Toy>(&toy(flaw), || flaw, &spec());
    }

    #[test]
    #[should_panic(expected = "restore accepted an invalid state (b = 100)")]
    fn a_restore_that_skips_validation_fails() {
        let flaw = Flaw::RestoreSkipsCheck;
        crate::persist_conformance::check::<Toy>(&toy(flaw), || flaw, &spec());
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    fn leading_ident(s: &str) -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    }

    /// The types this crate implements `Persist` for, and the types `check` is called with.
    fn impls_and_checks() -> (BTreeSet<String>, BTreeSet<String>) {
        let mut files = Vec::new();
        rust_files(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let (mut impls, mut checked) = (BTreeSet::new(), BTreeSet::new());
        let call = "persist_conformance::check::<";
        for file in files {
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                let line = line.trim_start();
                if line.starts_with("impl") {
                    if let Some(at) = line.find("Persist for ") {
                        impls.insert(leading_ident(&line[at + "Persist for ".len()..]));
                    }
                }
                for (at, _) in line.match_indices(call) {
                    checked.insert(leading_ident(&line[at + call.len()..]));
                }
            }
        }
        (impls, checked)
    }

    #[test]
    fn every_persist_impl_has_a_conformance_case() {
        let (impls, checked) = impls_and_checks();
        for known in [
            "Vcpu",
            "InKernelDevices",
            "SerialConsole",
            "I8042",
            "MmioTransport",
        ] {
            assert!(impls.contains(known), "the scan missed {known}: {impls:?}");
        }
        let missing: Vec<_> = impls.difference(&checked).collect();
        assert!(
            missing.is_empty(),
            "Persist implementations without a conformance case: {missing:?} \
             (call persist_conformance::check::<Type> from their tests)"
        );
    }
}
