//! Signing end to end, with real Ed25519 keys: keys on disk, `kiln sign` / `kiln verify` through
//! the library and the binary, every kind of tampering refused with its reason, co-signing, and
//! key records that rotate keys on a device's `KeyRing`.
//!
//! Everything runs on a small f32 model built in code, so it needs no test data.

mod common;

use common::{f32_data, t, u32_at};
use ed25519_dalek::SigningKey;
use kiln::ir;
use kiln::signing::{
    key_id_hex, load_public_key, load_signing_key, make_key_record, public_key_text, sign,
    sign_artifact, signing_key_id, verify_artifact, write_key_pair, SigningError,
};
use kiln_device::keys::{KeyAction, KeyError, KeyRecord, KeyRing, KEY_RECORD_LEN};
use kiln_runtime::format::{
    SectionKind, HEADER_LEN, MAX_SIGNATURES, SECTION_ENTRY_LEN, SIGNATURE_LEN, TRAILER_FIXED_LEN,
};
use kiln_runtime::graph::DType;
use kiln_runtime::signature::{key_id, SignatureError};
use kiln_runtime::ModelError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ---------------------------------------------------------------------------------------------
// Helpers.

/// FULLY_CONNECTED f32 (4 → 3): the smallest artifact the runtime accepts.
fn tiny_artifact() -> Vec<u8> {
    let g = ir::Graph {
        name: "tiny".into(),
        tensors: vec![
            t("x", DType::F32, &[1, 4], None, None),
            t("w", DType::F32, &[3, 4], Some(f32_data(12, 1)), None),
            t("b", DType::F32, &[3], Some(f32_data(3, 2)), None),
            t("y", DType::F32, &[1, 3], None, None),
        ],
        ops: vec![ir::Op {
            kind: ir::OpKind::FullyConnected {
                activation: kiln_runtime::graph::Activation::None,
            },
            inputs: vec![Some(0), Some(1), Some(2)],
            outputs: vec![3],
        }],
        inputs: vec![0],
        outputs: vec![3],
    };
    kiln::convert::assemble_graph(&g, "tiny").expect("assemble the tiny model")
}

/// A fixed key, so failures reproduce.
fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn public(k: &SigningKey) -> [u8; 32] {
    k.verifying_key().to_bytes()
}

fn body_len(bytes: &[u8]) -> usize {
    u32_at(bytes, 28) as usize
}

/// Recomputes the trailer's SHA-256 after the body was edited (what an attacker would do).
fn reseal(bytes: &mut [u8]) {
    reseal_at(bytes, body_len(bytes));
}

/// [`reseal`] for a body of `n` bytes (when the header's body length itself was edited).
fn reseal_at(bytes: &mut [u8], n: usize) {
    let digest = Sha256::digest(&bytes[..n]);
    bytes[n + 16..n + 48].copy_from_slice(&digest);
}

#[track_caller]
fn refused(bytes: &[u8], trusted: &[[u8; 32]]) -> SigningError {
    match verify_artifact(bytes, trusted) {
        Ok(info) => panic!("a bad artifact verified: {info:?}"),
        Err(e) => e,
    }
}

/// A fresh folder per test.
fn tmp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-signing-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exit 1 and exactly one line on stderr, `error: ...` containing `needle`.
#[track_caller]
fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Library: sign and verify.

#[test]
fn sign_then_verify_reports_the_stamped_fields() {
    let k = key(1);
    let unsigned = tiny_artifact();
    let signed = sign_artifact(&unsigned, &k, 7, 3, Some("mps2-an386")).unwrap();
    let info = verify_artifact(&signed, &[public(&k)]).unwrap();
    assert_eq!(info.model_version, 7);
    assert_eq!(info.security_counter, 3);
    assert_eq!(info.target, "mps2-an386");
    assert_eq!(info.key_id, key_id(&public(&k)));
    assert_eq!(info.signatures, vec![key_id(&public(&k))]);
    // Only the stamped header fields and the trailer differ from the unsigned artifact.
    let n = body_len(&unsigned);
    assert_eq!(body_len(&signed), n);
    assert_eq!(signed.len(), n + TRAILER_FIXED_LEN + SIGNATURE_LEN);
    assert_eq!(signed[..16], unsigned[..16]);
    assert_eq!(signed[24..32], unsigned[24..32]);
    assert_eq!(signed[48..n], unsigned[48..n]);
    // The device's loader takes it.
    let aligned = kiln::artifact::AlignedBytes::new(&signed);
    let model = kiln_runtime::Model::load(aligned.as_slice()).unwrap();
    assert_eq!(model.container().header.target_name(), "mps2-an386");
    // No target: any board.
    let any = sign_artifact(&unsigned, &k, 7, 3, None).unwrap();
    assert_eq!(verify_artifact(&any, &[public(&k)]).unwrap().target, "");
}

#[test]
fn verify_with_a_wrong_key_is_untrusted() {
    let signed = sign_artifact(&tiny_artifact(), &key(1), 1, 0, None).unwrap();
    let e = refused(&signed, &[public(&key(2))]);
    assert!(
        matches!(
            e,
            SigningError::Signature(SignatureError::UntrustedKey { key_id: id }) if id == key_id(&public(&key(1)))
        ),
        "{e:?}"
    );
    assert_eq!(e.code(), "untrusted_key");
    assert!(e.to_string().contains("not trusted"), "{e}");
    // No trusted keys at all: the same.
    assert_eq!(refused(&signed, &[]).code(), "untrusted_key");
}

#[test]
fn unsigned_is_refused() {
    let e = refused(&tiny_artifact(), &[public(&key(1))]);
    assert!(
        matches!(e, SigningError::Signature(SignatureError::Unsigned)),
        "{e:?}"
    );
    assert!(e.to_string().contains("kiln sign"), "{e}");
}

#[test]
fn truncated_is_refused() {
    let k = key(1);
    let signed = sign_artifact(&tiny_artifact(), &k, 1, 0, None).unwrap();
    let n = body_len(&signed);
    for len in [
        0,
        1,
        HEADER_LEN - 1,
        HEADER_LEN,
        n / 2,
        n,
        n + 1,
        n + TRAILER_FIXED_LEN - 1,
        n + TRAILER_FIXED_LEN,
        signed.len() - 1,
    ] {
        let e = refused(&signed[..len], &[public(&k)]);
        assert!(
            matches!(e, SigningError::Artifact(ModelError::Truncated { .. })),
            "length {len}: {e:?}"
        );
        assert_eq!(e.code(), "truncated");
    }
    // Bytes after the trailer are refused too.
    let mut longer = signed.clone();
    longer.push(0);
    assert_eq!(refused(&longer, &[public(&k)]).code(), "malformed");
}

/// Positions across the header, the section table, every section and the padding.
fn body_positions(bytes: &[u8]) -> Vec<usize> {
    let n = body_len(bytes);
    let count = u32_at(bytes, 12) as usize;
    let mut at: Vec<usize> = (0..HEADER_LEN).collect();
    for i in 0..count {
        let e = HEADER_LEN + i * SECTION_ENTRY_LEN;
        at.extend(e..e + SECTION_ENTRY_LEN);
        let (off, len) = (u32_at(bytes, e + 4) as usize, u32_at(bytes, e + 8) as usize);
        at.extend([off, off + len / 2, off + len.saturating_sub(1)]);
    }
    at.extend((0..n).step_by(7));
    at.push(n - 1);
    at.sort_unstable();
    at.dedup();
    at.retain(|&p| p < n);
    at
}

#[test]
fn any_flipped_byte_is_refused_with_its_reason() {
    let k = key(1);
    let trusted = [public(&k)];
    let signed = sign_artifact(&tiny_artifact(), &k, 5, 1, Some("board-a")).unwrap();
    let n = body_len(&signed);
    let sections_start = HEADER_LEN + u32_at(&signed, 12) as usize * SECTION_ENTRY_LEN;

    for at in body_positions(&signed) {
        // Flipped in place: the SHA-256 no longer matches (or the structure breaks first).
        let mut b = signed.clone();
        b[at] ^= 0x01;
        let e = refused(&b, &trusted);
        let payload = at >= sections_start || (16..28).contains(&at);
        if payload {
            assert!(
                matches!(e, SigningError::Artifact(ModelError::DigestMismatch)),
                "byte {at}: {e:?}"
            );
        } else {
            assert!(matches!(e, SigningError::Artifact(_)), "byte {at}: {e:?}");
        }
        // Flipped and re-sealed (the attacker recomputes the SHA-256): the signature catches it.
        reseal_at(&mut b, n);
        let e = refused(&b, &trusted);
        if payload {
            assert!(
                matches!(
                    e,
                    SigningError::Signature(SignatureError::BadSignature { .. })
                ),
                "byte {at} re-sealed: {e:?}"
            );
            assert_eq!(e.code(), "bad_signature");
        } else {
            assert!(
                matches!(
                    e,
                    SigningError::Signature(SignatureError::BadSignature { .. })
                        | SigningError::Artifact(_)
                ),
                "byte {at} re-sealed: {e:?}"
            );
        }
    }

    // The trailer: head, digest, key id, signature. Every byte.
    for at in n..signed.len() {
        let mut b = signed.clone();
        b[at] ^= 0x01;
        let e = refused(&b, &trusted);
        let rel = at - n;
        match rel {
            0..16 => assert!(
                matches!(e, SigningError::Artifact(_)),
                "trailer {rel}: {e:?}"
            ),
            16..48 => assert!(
                matches!(e, SigningError::Artifact(ModelError::DigestMismatch)),
                "digest byte {rel}: {e:?}"
            ),
            48..56 => assert!(
                matches!(
                    e,
                    SigningError::Signature(SignatureError::UntrustedKey { .. })
                ),
                "key id byte {rel}: {e:?}"
            ),
            _ => assert!(
                matches!(
                    e,
                    SigningError::Signature(SignatureError::BadSignature { .. })
                ),
                "signature byte {rel}: {e:?}"
            ),
        }
    }
}

#[test]
fn co_signing_by_two_keys_verifies_with_either() {
    let (a, b, c) = (key(1), key(2), key(3));
    let by_a = sign_artifact(&tiny_artifact(), &a, 4, 2, Some("board")).unwrap();
    let both = sign(&by_a, &b, 4, 2, Some("board")).unwrap();
    assert!(both.dropped.is_empty() && !both.replaced);
    assert_eq!(
        both.signatures,
        vec![signing_key_id(&a), signing_key_id(&b)]
    );
    let both = both.artifact;
    // The body is unchanged by co-signing.
    assert_eq!(both[..body_len(&both)], by_a[..body_len(&by_a)]);
    assert_eq!(
        verify_artifact(&both, &[public(&a)]).unwrap().key_id,
        signing_key_id(&a)
    );
    assert_eq!(
        verify_artifact(&both, &[public(&b)]).unwrap().key_id,
        signing_key_id(&b)
    );
    verify_artifact(&both, &[public(&a), public(&b)]).unwrap();
    assert_eq!(refused(&both, &[public(&c)]).code(), "untrusted_key");

    // Signing again with a key already there replaces its signature instead of adding one.
    let again = sign(&both, &a, 4, 2, Some("board")).unwrap();
    assert!(again.replaced);
    assert_eq!(again.signatures.len(), 2);
    verify_artifact(&again.artifact, &[public(&a), public(&b)]).unwrap();

    // A broken signature by a trusted key refuses the artifact even if another one verifies;
    // a broken signature by a key this device does not know is ignored.
    let mut bad_b = both.clone();
    let last = bad_b.len() - 1;
    bad_b[last] ^= 0x80;
    verify_artifact(&bad_b, &[public(&a)]).unwrap();
    let e = refused(&bad_b, &[public(&a), public(&b)]);
    assert!(
        matches!(e, SigningError::Signature(SignatureError::BadSignature { key_id: id }) if id == signing_key_id(&b)),
        "{e:?}"
    );
}

#[test]
fn re_signing_with_a_different_version_drops_old_signatures() {
    let (a, b) = (key(1), key(2));
    let v1 = sign_artifact(&tiny_artifact(), &a, 1, 0, None).unwrap();
    let v1 = sign_artifact(&v1, &b, 1, 0, None).unwrap();
    let v2 = sign(&v1, &b, 2, 0, None).unwrap();
    // b's own earlier signature is replaced; a's is dropped and a must sign v2 again.
    assert_eq!(v2.dropped, vec![signing_key_id(&a)]);
    assert!(v2.replaced);
    assert_eq!(v2.signatures, vec![signing_key_id(&b)]);
    assert_eq!(
        verify_artifact(&v2.artifact, &[public(&b)])
            .unwrap()
            .model_version,
        2
    );
    assert_eq!(refused(&v2.artifact, &[public(&a)]).code(), "untrusted_key");
    // A new counter or target changes the body just the same.
    for (counter, target) in [(1, None), (0, Some("other"))] {
        let r = sign(&v1, &a, 1, counter, target).unwrap();
        assert_eq!(r.dropped, vec![signing_key_id(&b)], "{counter} {target:?}");
        assert_eq!(r.signatures.len(), 1);
    }
}

#[test]
fn at_most_eight_signatures() {
    let mut art = tiny_artifact();
    for seed in 0..MAX_SIGNATURES as u8 {
        art = sign_artifact(&art, &key(seed + 1), 1, 0, None).unwrap();
    }
    let all: Vec<_> = (1..=MAX_SIGNATURES as u8)
        .map(|s| public(&key(s)))
        .collect();
    assert_eq!(verify_artifact(&art, &all).unwrap().signatures.len(), 8);
    assert!(matches!(
        sign(&art, &key(100), 1, 0, None),
        Err(SigningError::TooManySignatures)
    ));
    // A signer already on it may still re-sign.
    assert!(sign(&art, &key(3), 1, 0, None).unwrap().replaced);
}

#[test]
fn sign_refuses_damaged_artifacts_and_bad_targets() {
    let k = key(1);
    let mut not_kiln = tiny_artifact();
    not_kiln[0] = b'X';
    assert!(matches!(
        sign(&not_kiln, &k, 1, 0, None),
        Err(SigningError::Artifact(ModelError::BadMagic))
    ));
    // A graph the runtime refuses is not signed either, even with a matching SHA-256.
    let mut bad_graph = tiny_artifact();
    let graph_at = u32_at(&bad_graph, HEADER_LEN + 4) as usize;
    bad_graph[graph_at..graph_at + 8].fill(0xff);
    reseal(&mut bad_graph);
    assert!(matches!(
        sign(&bad_graph, &k, 1, 0, None),
        Err(SigningError::Artifact(_))
    ));
    let mut digest_off = tiny_artifact();
    let n = body_len(&digest_off);
    digest_off[n + 20] ^= 1;
    assert!(matches!(
        sign(&digest_off, &k, 1, 0, None),
        Err(SigningError::Artifact(ModelError::DigestMismatch))
    ));
    for bad in ["", "UPPER", "has space", "seventeen-letters", "é"] {
        assert!(
            matches!(
                sign(&tiny_artifact(), &k, 1, 0, Some(bad)),
                Err(SigningError::BadTarget(_))
            ),
            "{bad:?}"
        );
    }
    // Sixteen characters is the most that fits, and fits exactly.
    let full = sign_artifact(&tiny_artifact(), &k, 1, 0, Some("sixteen-letters.")).unwrap();
    assert_eq!(
        verify_artifact(&full, &[public(&k)]).unwrap().target,
        "sixteen-letters."
    );
}

// ---------------------------------------------------------------------------------------------
// Library: key records on a device's key ring.

#[test]
fn admitted_key_makes_its_artifacts_verify() {
    let (old, new) = (key(1), key(2));
    let built_in = [public(&old)];
    let mut ring = KeyRing::new(&built_in, &[]);
    let by_new = sign_artifact(&tiny_artifact(), &new, 1, 0, None).unwrap();
    let trusted = |ring: &KeyRing| {
        let mut keys = [[0u8; 32]; 8];
        let n = ring.all(&mut keys);
        keys[..n].to_vec()
    };
    assert_eq!(refused(&by_new, &trusted(&ring)).code(), "untrusted_key");

    let record = make_key_record(KeyAction::Admit, &public(&new), &old);
    assert_eq!(record.len(), KEY_RECORD_LEN);
    let parsed = KeyRecord::parse(&record).unwrap();
    assert_eq!(parsed.action, KeyAction::Admit);
    assert_eq!(parsed.signer, signing_key_id(&old));
    ring.apply(&parsed).unwrap();
    assert!(ring.contains(&public(&new)));
    verify_artifact(&by_new, &trusted(&ring)).unwrap();

    // Revoke it again (signed by the built-in key): its artifacts no longer verify.
    let revoke = make_key_record(KeyAction::Revoke, &public(&new), &old);
    ring.apply(&KeyRecord::parse(&revoke).unwrap()).unwrap();
    assert!(!ring.contains(&public(&new)));
    assert_eq!(refused(&by_new, &trusted(&ring)).code(), "untrusted_key");
    // A compiled-in key cannot be revoked by a record.
    let revoke_builtin = make_key_record(KeyAction::Revoke, &public(&old), &old);
    assert_eq!(
        ring.apply(&KeyRecord::parse(&revoke_builtin).unwrap()),
        Err(KeyError::BuiltInKey)
    );
}

#[test]
fn key_record_by_an_untrusted_key_or_with_a_flipped_byte_is_refused() {
    let (trusted, stranger, new) = (key(1), key(9), key(2));
    let built_in = [public(&trusted)];
    let mut ring = KeyRing::new(&built_in, &[]);
    let forged = make_key_record(KeyAction::Admit, &public(&new), &stranger);
    assert_eq!(
        ring.apply(&KeyRecord::parse(&forged).unwrap()),
        Err(KeyError::UntrustedSigner {
            key_id: signing_key_id(&stranger)
        })
    );
    let good = make_key_record(KeyAction::Admit, &public(&new), &trusted);
    for at in 0..KEY_RECORD_LEN {
        let mut b = good;
        b[at] ^= 0x01;
        let result = KeyRecord::parse(&b).and_then(|r| ring.clone().apply(&r));
        assert!(result.is_err(), "flipped byte {at} was accepted");
        let err = result.unwrap_err();
        match at {
            16..48 | 56..120 => assert_eq!(err, KeyError::BadSignature, "byte {at}"),
            48..56 => assert!(
                matches!(err, KeyError::UntrustedSigner { .. }),
                "byte {at}: {err:?}"
            ),
            // Action 1 → 0 or 3, magic, version, reserved.
            _ => assert!(
                matches!(err, KeyError::BadRecord { .. }),
                "byte {at}: {err:?}"
            ),
        }
    }
    assert!(!ring.contains(&public(&new)));
    ring.apply(&KeyRecord::parse(&good).unwrap()).unwrap();
    assert!(ring.contains(&public(&new)));
}

// ---------------------------------------------------------------------------------------------
// Key files.

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn key_files_round_trip_and_mistakes_are_named() {
    let dir = tmp_dir("keyfiles");
    let k = key(5);
    let paths = write_key_pair(&dir.join("ci"), &k, false).unwrap();
    assert_eq!(paths.secret, dir.join("ci.key"));
    assert_eq!(paths.public, dir.join("ci.pub"));
    assert_eq!(
        load_signing_key(&paths.secret).unwrap().to_bytes(),
        k.to_bytes()
    );
    assert_eq!(load_public_key(&paths.public).unwrap(), public(&k));
    // The wrong half, junk, a missing file: one line naming the file and what to do.
    let e = load_signing_key(&paths.public).unwrap_err();
    assert!(
        e.to_string().contains("ci.pub") && e.to_string().contains("NAME.key"),
        "{e}"
    );
    let e = load_public_key(&paths.secret).unwrap_err();
    assert!(
        e.to_string().contains("ci.key") && e.to_string().contains("NAME.pub"),
        "{e}"
    );
    let junk = dir.join("junk.pub");
    std::fs::write(&junk, [0xffu8, 0, 1, 2]).unwrap();
    let e = load_public_key(&junk).unwrap_err();
    assert!(e.to_string().contains("kiln keygen"), "{e}");
    let e = load_signing_key(&dir.join("missing.key")).unwrap_err();
    assert!(e.to_string().starts_with("cannot read"), "{e}");
    for e in [
        load_signing_key(&paths.public).unwrap_err(),
        load_public_key(&junk).unwrap_err(),
    ] {
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
    }
    // 32 bytes that are not a curve point (about half of all y values have no x).
    let not_a_point = (2..=255u8)
        .map(|y| {
            let mut b = [0u8; 32];
            b[0] = y;
            b
        })
        .find(|b| ed25519_dalek::VerifyingKey::from_bytes(b).is_err())
        .expect("some y is not on the curve");
    let bad = dir.join("bad.pub");
    std::fs::write(&bad, public_key_text(&not_a_point)).unwrap();
    let e = load_public_key(&bad).unwrap_err();
    assert!(
        e.to_string().contains("not a valid Ed25519 public key"),
        "{e}"
    );
    // Existing files are kept unless forced.
    let other = key(6);
    assert!(matches!(
        write_key_pair(&dir.join("ci"), &other, false),
        Err(SigningError::Exists { .. })
    ));
    assert_eq!(
        load_signing_key(&paths.secret).unwrap().to_bytes(),
        k.to_bytes()
    );
    write_key_pair(&dir.join("ci"), &other, true).unwrap();
    assert_eq!(
        load_signing_key(&paths.secret).unwrap().to_bytes(),
        other.to_bytes()
    );
}

// ---------------------------------------------------------------------------------------------
// The binary.

#[test]
fn cli_keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tmp_dir("keygen").join("keys");
    let name = dir.join("release");
    let out = kiln(&["keygen", "-o", s(&name), "--json"]);
    assert_ok(&out);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let secret = dir.join("release.key");
    let public_file = dir.join("release.pub");
    assert_eq!(j["secret_key"], s(&secret));
    assert_eq!(j["public_key"], s(&public_file));
    let pk = load_public_key(&public_file).unwrap();
    assert_eq!(j["key_id"], key_id_hex(&key_id(&pk)));
    assert_eq!(
        load_signing_key(&secret)
            .unwrap()
            .verifying_key()
            .to_bytes(),
        pk
    );
    #[cfg(unix)]
    assert_eq!(mode(&secret), 0o600);
    let first = std::fs::read(&secret).unwrap();

    // Again: refused, nothing touched.
    let out = kiln(&["keygen", "-o", s(&name)]);
    assert_one_line_error(&out, "already exists");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(&secret).unwrap(), first);
    // Only the .pub exists: still refused, and no .key is written.
    let lone = dir.join("lone");
    std::fs::write(dir.join("lone.pub"), "x").unwrap();
    assert_one_line_error(&kiln(&["keygen", "-o", s(&lone)]), "lone.pub");
    assert!(!dir.join("lone.key").exists());

    // --force: a new key, created afresh with mode 0600 even over a world-readable file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = kiln(&["keygen", "-o", s(&name), "--force"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let pk2 = load_public_key(&public_file).unwrap();
    assert_ne!(pk2, pk);
    assert!(err.contains(&key_id_hex(&key_id(&pk2))), "{err}");
    assert_ne!(std::fs::read(&secret).unwrap(), first);
    #[cfg(unix)]
    assert_eq!(mode(&secret), 0o600);
}

#[test]
fn cli_sign_verify_inspect_and_tampering() {
    let dir = tmp_dir("sign");
    let unsigned = dir.join("model.kiln");
    std::fs::write(&unsigned, tiny_artifact()).unwrap();
    for n in ["a", "b", "c"] {
        assert_ok(&kiln(&["keygen", "-o", s(&dir.join(n))]));
    }
    let (a_key, a_pub) = (dir.join("a.key"), dir.join("a.pub"));
    let (b_key, b_pub) = (dir.join("b.key"), dir.join("b.pub"));
    let c_pub = dir.join("c.pub");
    let a_id = key_id_hex(&key_id(&load_public_key(&a_pub).unwrap()));
    let b_id = key_id_hex(&key_id(&load_public_key(&b_pub).unwrap()));

    let signed = dir.join("signed.kiln");
    let out = kiln(&[
        "sign",
        s(&unsigned),
        "--key",
        s(&a_key),
        "--version",
        "7",
        "--security-counter",
        "2",
        "--target",
        "mps2-an386",
        "-o",
        s(&signed),
        "--json",
    ]);
    assert_ok(&out);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["key_id"], a_id.as_str());
    assert_eq!(j["signatures"], serde_json::json!([a_id]));

    // verify: exit 0 with the fields, for people and for scripts.
    let out = kiln(&["verify", s(&signed), "--pubkey", s(&a_pub)]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "version 7",
        "security counter 2",
        "mps2-an386",
        a_id.as_str(),
    ] {
        assert!(err.contains(want), "`{want}` missing: {err}");
    }
    let out = kiln(&[
        "verify",
        s(&signed),
        "--pubkey",
        s(&c_pub),
        "--pubkey",
        s(&a_pub),
        "--json",
    ]);
    assert_ok(&out);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["valid"], true);
    assert_eq!(j["version"], 7);
    assert_eq!(j["security_counter"], 2);
    assert_eq!(j["target"], "mps2-an386");
    assert_eq!(j["key_id"], a_id.as_str());

    // inspect shows what was stamped and who signed.
    let out = kiln(&["inspect", s(&signed), "--json"]);
    assert_ok(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["model_version"], 7);
    assert_eq!(r["security_counter"], 2);
    assert_eq!(r["target"], "mps2-an386");
    assert_eq!(r["signature_key_ids"], serde_json::json!([a_id]));
    let table = String::from_utf8_lossy(&kiln(&["inspect", s(&signed)]).stderr).into_owned();
    assert!(
        table.contains("target       mps2-an386") && table.contains(&format!("key {a_id}")),
        "{table}"
    );
    let table = String::from_utf8_lossy(&kiln(&["inspect", s(&unsigned)]).stderr).into_owned();
    assert!(
        table.contains("any board") && table.contains("unsigned"),
        "{table}"
    );

    // Refusals: one line on stderr, exit 1, and a reason code with --json.
    let check = |path: &Path, pubkey: &Path, needle: &str, code: &str| {
        let out = kiln(&["verify", s(path), "--pubkey", s(pubkey)]);
        assert_one_line_error(&out, needle);
        let out = kiln(&["verify", s(path), "--pubkey", s(pubkey), "--json"]);
        assert_eq!(out.status.code(), Some(1));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (j["valid"].as_bool(), j["reason"].as_str()),
            (Some(false), Some(code))
        );
    };
    check(&signed, &c_pub, "not trusted", "untrusted_key");
    check(&unsigned, &a_pub, "not signed", "unsigned");
    let bytes = std::fs::read(&signed).unwrap();
    let n = body_len(&bytes);
    let tampered = dir.join("tampered.kiln");
    let mut b = bytes.clone();
    b[n - 3] ^= 0x10;
    std::fs::write(&tampered, &b).unwrap();
    check(
        &tampered,
        &a_pub,
        "SHA-256 does not match",
        "digest_mismatch",
    );
    reseal(&mut b);
    std::fs::write(&tampered, &b).unwrap();
    check(
        &tampered,
        &a_pub,
        "changed after it was signed",
        "bad_signature",
    );
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 0x01;
    std::fs::write(&tampered, &b).unwrap();
    check(
        &tampered,
        &a_pub,
        "changed after it was signed",
        "bad_signature",
    );
    std::fs::write(&tampered, &bytes[..bytes.len() - 10]).unwrap();
    check(&tampered, &a_pub, "truncated", "truncated");
    std::fs::write(&tampered, b"not a model").unwrap();
    check(&tampered, &a_pub, "truncated", "truncated");
    std::fs::write(&tampered, vec![0u8; 256]).unwrap();
    check(&tampered, &a_pub, "not a Kiln artifact", "malformed");

    // Co-signing with the same fields keeps a's signature; either key verifies.
    let both = dir.join("both.kiln");
    assert_ok(&kiln(&[
        "sign",
        s(&signed),
        "--key",
        s(&b_key),
        "--version",
        "7",
        "--security-counter",
        "2",
        "--target",
        "mps2-an386",
        "-o",
        s(&both),
    ]));
    for p in [&a_pub, &b_pub] {
        let out = kiln(&["verify", s(&both), "--pubkey", s(p), "--json"]);
        assert_ok(&out);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["signatures"], serde_json::json!([a_id, b_id]));
    }
    // A new version drops both and says so.
    let v8 = dir.join("v8.kiln");
    let out = kiln(&[
        "sign",
        s(&both),
        "--key",
        s(&b_key),
        "--version",
        "8",
        "-o",
        s(&v8),
    ]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dropped") && err.contains(&a_id), "{err}");
    assert_ok(&kiln(&["verify", s(&v8), "--pubkey", s(&b_pub)]));
    check(&v8, &a_pub, "not trusted", "untrusted_key");
}

#[test]
fn cli_sign_refuses_bad_input_with_one_line() {
    let dir = tmp_dir("sign-errors");
    let model = dir.join("model.kiln");
    std::fs::write(&model, tiny_artifact()).unwrap();
    assert_ok(&kiln(&["keygen", "-o", s(&dir.join("k"))]));
    let (k, p) = (dir.join("k.key"), dir.join("k.pub"));
    let o = dir.join("out.kiln");
    let out = kiln(&[
        "sign",
        s(&model),
        "--key",
        s(&k),
        "--version",
        "1",
        "--target",
        "STM32",
        "-o",
        s(&o),
    ]);
    assert_one_line_error(&out, "target board `STM32`");
    let out = kiln(&[
        "sign",
        s(&model),
        "--key",
        s(&p),
        "--version",
        "1",
        "-o",
        s(&o),
    ]);
    assert_one_line_error(&out, "this is a public key");
    let out = kiln(&[
        "sign",
        s(&model),
        "--key",
        s(&dir.join("none.key")),
        "--version",
        "1",
        "-o",
        s(&o),
    ]);
    assert_one_line_error(&out, "cannot read");
    let junk = dir.join("junk.kiln");
    std::fs::write(&junk, [7u8; 100]).unwrap();
    let out = kiln(&[
        "sign",
        s(&junk),
        "--key",
        s(&k),
        "--version",
        "1",
        "-o",
        s(&o),
    ]);
    assert_one_line_error(&out, "cannot sign");
    assert!(!o.exists());
    let out = kiln(&["verify", s(&model), "--pubkey", s(&k)]);
    assert_one_line_error(&out, "this is a secret key");
    // --version is required, and --help teaches with an example.
    let out = kiln(&["sign", s(&model), "--key", s(&k), "-o", s(&o)]);
    assert_eq!(out.status.code(), Some(2));
    for verb in ["keygen", "sign", "verify", "admit-key", "revoke-key"] {
        let out = kiln(&[verb, "--help"]);
        assert_ok(&out);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Example: `kiln"), "{verb}: {help}");
    }
}

#[test]
fn cli_admit_and_revoke_key_records() {
    let dir = tmp_dir("records");
    for n in ["old", "new"] {
        assert_ok(&kiln(&["keygen", "-o", s(&dir.join(n))]));
    }
    let old_pub = load_public_key(&dir.join("old.pub")).unwrap();
    let new_pub = load_public_key(&dir.join("new.pub")).unwrap();
    let admit = dir.join("new.kkey");
    let out = kiln(&[
        "admit-key",
        s(&dir.join("new.pub")),
        "--key",
        s(&dir.join("old.key")),
        "-o",
        s(&admit),
        "--json",
    ]);
    assert_ok(&out);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["action"], "admit");
    assert_eq!(j["subject_key_id"], key_id_hex(&key_id(&new_pub)));
    assert_eq!(j["signer_key_id"], key_id_hex(&key_id(&old_pub)));
    let bytes = std::fs::read(&admit).unwrap();
    assert_eq!(bytes.len(), KEY_RECORD_LEN);

    // A device that trusts `old` admits `new`, and then takes models signed by `new`.
    let built_in = [old_pub];
    let mut ring = KeyRing::new(&built_in, &[]);
    ring.apply(&KeyRecord::parse(&bytes).unwrap()).unwrap();
    let art = dir.join("m.kiln");
    std::fs::write(&art, tiny_artifact()).unwrap();
    assert_ok(&kiln(&[
        "sign",
        s(&art),
        "--key",
        s(&dir.join("new.key")),
        "--version",
        "3",
        "-o",
        s(&art),
    ]));
    let mut keys = [[0u8; 32]; 8];
    let n = ring.all(&mut keys);
    verify_artifact(&std::fs::read(&art).unwrap(), &keys[..n]).unwrap();

    // A device that trusts only `new` refuses a record signed by... `old`? It does not know it.
    let only_new = [new_pub];
    let mut other = KeyRing::new(&only_new, &[]);
    assert!(matches!(
        other.apply(&KeyRecord::parse(&bytes).unwrap()),
        Err(KeyError::UntrustedSigner { .. })
    ));

    // Revoke: signed by `old`, removes `new` again.
    let revoke = dir.join("new-revoke.kkey");
    let out = kiln(&[
        "revoke-key",
        s(&dir.join("new.pub")),
        "--key",
        s(&dir.join("old.key")),
        "-o",
        s(&revoke),
    ]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoke key"));
    let rec = KeyRecord::parse(&std::fs::read(&revoke).unwrap()).unwrap();
    assert_eq!(rec.action, KeyAction::Revoke);
    ring.apply(&rec).unwrap();
    assert!(!ring.contains(&new_pub));

    // Mixing up the files is caught before anything is written.
    let wrong = dir.join("wrong.kkey");
    let out = kiln(&[
        "admit-key",
        s(&dir.join("new.key")),
        "--key",
        s(&dir.join("old.key")),
        "-o",
        s(&wrong),
    ]);
    assert_one_line_error(&out, "this is a secret key");
    assert!(!wrong.exists());
}

/// The sections the tiny model has (a smoke check that the helpers above see real sections).
#[test]
fn tiny_artifact_has_graph_weights_and_manifest() {
    let a = tiny_artifact();
    let c = kiln_runtime::format::Container::parse(&a).unwrap();
    for k in [
        SectionKind::Graph,
        SectionKind::Weights,
        SectionKind::Manifest,
    ] {
        assert!(c.section(k).is_some(), "{k:?}");
    }
}
