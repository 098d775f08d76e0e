//! JWT attack cases against the verifier, with tokens minted both here (by
//! jsonwebtoken, or by hand for malformed ones) and by an independent
//! implementation, PyJWT (`tests/fixtures/mint_pyjwt.py`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use jwt_kit::{JwtConfig, JwtError, JwtVerifier, KeySet, VerifyingKey};
use serde_json::{Value, json};

const NOW: i64 = 1_795_557_600; // 2026-11-24T22:00:00Z, as in the fixtures
const SECRET: &[u8] = b"pyjwt-fixture-secret-0123456789abcdef";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn keys() -> KeySet {
    KeySet::new()
        .with_key(VerifyingKey::hs256("hs", SECRET))
        .unwrap()
        .with_key(VerifyingKey::rs256_pem("rs", &fixture("rsa_public.pem")).unwrap())
        .unwrap()
        .with_key(VerifyingKey::es256_pem("es", &fixture("ec_public.pem")).unwrap())
        .unwrap()
        .with_key(VerifyingKey::eddsa_pem("ed", &fixture("ed25519_public.pem")).unwrap())
        .unwrap()
}

fn verifier() -> JwtVerifier {
    JwtVerifier::new(
        keys(),
        JwtConfig::default()
            .with_issuer("https://issuer.test")
            .with_audience("gateway"),
    )
}

fn claims() -> Value {
    json!({"sub": "alice", "iss": "https://issuer.test", "aud": "gateway", "exp": NOW + 600, "iat": NOW - 10, "roles": ["admin"]})
}

fn with(changes: Value) -> Value {
    let mut c = claims();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture("ec_private.pem")).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&fixture("ed25519_private.pem")).unwrap(),
        _ => unreachable!(),
    };
    encode(&header, claims, &key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, Some("hs"), claims)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// A token with an arbitrary header, HMAC-signed with `key` over the usual input.
fn raw_hs256(header: &Value, claims: &Value, key: &[u8]) -> String {
    use hmac_sha256::hmac;
    let input = format!("{}.{}", b64(header), b64(claims));
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(hmac(key, input.as_bytes()))
    )
}

/// Minimal HMAC-SHA256 over sha2, so hand-built tokens need no extra crate.
mod hmac_sha256 {
    use sha2::{Digest, Sha256};

    pub(super) fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
        let outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
        let inner_hash = Sha256::new()
            .chain_update(&inner)
            .chain_update(message)
            .finalize();
        Sha256::new()
            .chain_update(&outer)
            .chain_update(inner_hash)
            .finalize()
            .into()
    }
}

fn rejects(token: &str, expected: JwtError) {
    assert_eq!(
        verifier().verify_at(token, NOW),
        Err(expected),
        "token {token:.60}"
    );
}

// ---------------------------------------------------------------- accepted

#[test]
fn each_supported_algorithm_verifies() {
    for (alg, kid) in [
        (Algorithm::HS256, "hs"),
        (Algorithm::RS256, "rs"),
        (Algorithm::ES256, "es"),
        (Algorithm::EdDSA, "ed"),
    ] {
        let c = verifier()
            .verify_at(&sign(alg, Some(kid), &claims()), NOW)
            .unwrap();
        assert_eq!((c.subject.as_str(), c.kid.as_str()), ("alice", kid));
        assert_eq!(c.roles, vec!["admin".to_owned()]);
        assert_eq!(c.expires_at, NOW + 600);
    }
}

#[test]
fn pyjwt_minted_tokens_verify_or_fail_as_expected() {
    let fixtures: Value = serde_json::from_slice(&fixture("pyjwt_tokens.json")).unwrap();
    assert_eq!(fixtures["now"], NOW);
    let t = |name: &str| fixtures["tokens"][name].as_str().unwrap().to_owned();
    let v = verifier();
    for name in [
        "valid_hs256",
        "valid_rs256",
        "valid_es256",
        "valid_eddsa",
        "valid_aud_list",
    ] {
        let claims = v
            .verify_at(&t(name), NOW)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(claims.subject, "alice", "{name}");
    }
    let expectations = [
        ("expired_hs256", JwtError::Expired),
        ("wrong_secret_hs256", JwtError::InvalidSignature),
        ("none_alg", JwtError::AlgNone),
        (
            "hs256_keyed_with_rsa_public_pem",
            JwtError::AlgorithmMismatch {
                token: "HS256".into(),
                pinned: "RS256".into(),
            },
        ),
        ("rs256_other_key", JwtError::InvalidSignature),
        ("wrong_issuer", JwtError::InvalidIssuer),
        ("wrong_audience", JwtError::InvalidAudience),
        ("jku_injection", JwtError::ForbiddenHeader("jku")),
    ];
    for (name, expected) in expectations {
        assert_eq!(v.verify_at(&t(name), NOW), Err(expected), "{name}");
    }
}

#[test]
fn leeway_applies_to_exp_and_nbf() {
    let v = verifier();
    assert!(
        v.verify_at(&hs(&with(json!({"exp": NOW - 30}))), NOW)
            .is_ok(),
        "inside the 30 s leeway"
    );
    assert!(
        v.verify_at(&hs(&with(json!({"nbf": NOW + 30}))), NOW)
            .is_ok()
    );
    assert!(
        v.verify_at(&hs(&with(json!({"exp": NOW as f64 + 0.5}))), NOW)
            .is_ok(),
        "fractional NumericDate"
    );
    let strict = JwtVerifier::new(keys(), JwtConfig::default().with_leeway_secs(0));
    assert_eq!(
        strict.verify_at(&hs(&with(json!({"exp": NOW - 1}))), NOW),
        Err(JwtError::Expired)
    );
}

#[test]
fn a_default_kid_serves_tokens_without_one() {
    let v = JwtVerifier::new(keys().with_default_kid("hs"), JwtConfig::default());
    assert!(
        v.verify_at(&sign(Algorithm::HS256, None, &claims()), NOW)
            .is_ok()
    );
    // The default key is still pinned: an RS256 token without kid is refused.
    assert!(matches!(
        v.verify_at(&sign(Algorithm::RS256, None, &claims()), NOW),
        Err(JwtError::AlgorithmMismatch { .. })
    ));
}

// ---------------------------------------------------------------- algorithm attacks

#[test]
fn alg_none_in_every_spelling_is_rejected() {
    for alg in ["none", "None", "NONE", "nOnE"] {
        let token = format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "kid": "hs"})),
            b64(&claims())
        );
        rejects(&token, JwtError::AlgNone);
    }
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    let token = raw_hs256(
        &json!({"alg": "HS256", "kid": "rs"}),
        &claims(),
        &fixture("rsa_public.pem"),
    );
    rejects(
        &token,
        JwtError::AlgorithmMismatch {
            token: "HS256".into(),
            pinned: "RS256".into(),
        },
    );
}

#[test]
fn rs256_header_against_an_hmac_key_is_rejected() {
    let token = sign(Algorithm::RS256, Some("hs"), &claims());
    rejects(
        &token,
        JwtError::AlgorithmMismatch {
            token: "RS256".into(),
            pinned: "HS256".into(),
        },
    );
}

#[test]
fn es256_header_against_an_eddsa_key_is_rejected() {
    let token = sign(Algorithm::ES256, Some("ed"), &claims());
    rejects(
        &token,
        JwtError::AlgorithmMismatch {
            token: "ES256".into(),
            pinned: "EdDSA".into(),
        },
    );
}

#[test]
fn unsupported_algorithms_are_rejected() {
    for alg in ["HS512", "RS512", "PS256", "ES384", "XYZ"] {
        let token = format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": alg, "kid": "hs"})),
            b64(&claims())
        );
        assert!(
            matches!(
                verifier().verify_at(&token, NOW),
                Err(JwtError::UnsupportedAlgorithm(_))
            ),
            "{alg}"
        );
    }
}

// ---------------------------------------------------------------- key selection

#[test]
fn unknown_kid_is_rejected() {
    rejects(
        &sign(Algorithm::HS256, Some("nope"), &claims()),
        JwtError::UnknownKid,
    );
}

#[test]
fn missing_kid_without_a_default_is_rejected() {
    rejects(
        &sign(Algorithm::HS256, None, &claims()),
        JwtError::MissingKid,
    );
}

#[test]
fn non_string_kid_is_rejected() {
    let token = raw_hs256(&json!({"alg": "HS256", "kid": 7}), &claims(), SECRET);
    rejects(&token, JwtError::Malformed("kid is not a string"));
}

#[test]
fn key_carrying_headers_are_rejected() {
    let jwk =
        json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode(b"attacker-chosen-secret-0123456789")});
    for (field, value) in [
        ("jku", json!("https://evil.test/jwks.json")),
        ("x5u", json!("https://evil.test/cert.pem")),
        ("jwk", jwk),
        ("x5c", json!(["MIIB..."])),
        ("crit", json!(["exp"])),
    ] {
        let mut header = json!({"alg": "HS256", "kid": "hs"});
        header[field] = value;
        let token = raw_hs256(&header, &claims(), SECRET);
        assert!(
            matches!(
                verifier().verify_at(&token, NOW),
                Err(JwtError::ForbiddenHeader(_))
            ),
            "{field}"
        );
    }
}

// ---------------------------------------------------------------- signature

#[test]
fn a_tampered_payload_fails_the_signature() {
    let token = hs(&claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = b64(&with(json!({"sub": "root", "roles": ["superuser"]})));
    parts[1] = &forged;
    rejects(&parts.join("."), JwtError::InvalidSignature);
}

#[test]
fn a_tampered_signature_fails() {
    let token = hs(&claims());
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    bytes[0] ^= 1;
    rejects(
        &format!("{input}.{}", URL_SAFE_NO_PAD.encode(bytes)),
        JwtError::InvalidSignature,
    );
}

#[test]
fn a_stripped_signature_fails() {
    let token = hs(&claims());
    let (input, _) = token.rsplit_once('.').unwrap();
    rejects(&format!("{input}."), JwtError::InvalidSignature);
}

#[test]
fn a_token_signed_with_another_secret_fails() {
    let token = raw_hs256(
        &json!({"alg": "HS256", "kid": "hs"}),
        &claims(),
        b"another-secret-that-is-32-bytes-long!",
    );
    rejects(&token, JwtError::InvalidSignature);
}

#[test]
fn an_es256_signature_from_another_curve_key_fails() {
    // Signed by the Ed25519 key but claiming ES256 with the ES key's kid.
    let ed = sign(Algorithm::EdDSA, Some("es"), &claims());
    let (_, sig) = ed.rsplit_once('.').unwrap();
    let forged = format!(
        "{}.{}.{sig}",
        b64(&json!({"alg": "ES256", "kid": "es", "typ": "JWT"})),
        b64(&claims())
    );
    rejects(&forged, JwtError::InvalidSignature);
}

// ---------------------------------------------------------------- claims

#[test]
fn expired_tokens_are_rejected() {
    rejects(&hs(&with(json!({"exp": NOW - 31}))), JwtError::Expired);
}

#[test]
fn missing_exp_is_rejected() {
    rejects(
        &hs(&with(json!({"exp": null}))),
        JwtError::MissingClaim("exp"),
    );
}

#[test]
fn exp_of_the_wrong_type_is_rejected() {
    rejects(
        &hs(&with(json!({"exp": "2100-01-01"}))),
        JwtError::InvalidClaimType("exp"),
    );
    rejects(
        &hs(&with(json!({"exp": true}))),
        JwtError::InvalidClaimType("exp"),
    );
}

#[test]
fn not_yet_valid_tokens_are_rejected() {
    rejects(&hs(&with(json!({"nbf": NOW + 31}))), JwtError::NotYetValid);
    rejects(
        &hs(&with(json!({"nbf": "soon"}))),
        JwtError::InvalidClaimType("nbf"),
    );
}

#[test]
fn tokens_issued_in_the_future_are_rejected() {
    rejects(
        &hs(&with(json!({"iat": NOW + 3_600}))),
        JwtError::IssuedInFuture,
    );
}

#[test]
fn issuer_is_required_and_checked_when_configured() {
    rejects(
        &hs(&with(json!({"iss": null}))),
        JwtError::MissingClaim("iss"),
    );
    rejects(
        &hs(&with(json!({"iss": "https://evil.test"}))),
        JwtError::InvalidIssuer,
    );
    rejects(
        &hs(&with(json!({"iss": ["https://issuer.test"]}))),
        JwtError::InvalidClaimType("iss"),
    );
    // Without issuers configured, iss is optional.
    let open = JwtVerifier::new(keys(), JwtConfig::default());
    assert!(
        open.verify_at(&hs(&with(json!({"iss": null, "aud": null}))), NOW)
            .is_ok()
    );
}

#[test]
fn audience_is_required_and_checked_when_configured() {
    rejects(
        &hs(&with(json!({"aud": null}))),
        JwtError::MissingClaim("aud"),
    );
    rejects(
        &hs(&with(json!({"aud": "billing"}))),
        JwtError::InvalidAudience,
    );
    rejects(
        &hs(&with(json!({"aud": ["billing", "search"]}))),
        JwtError::InvalidAudience,
    );
    rejects(
        &hs(&with(json!({"aud": 42}))),
        JwtError::InvalidClaimType("aud"),
    );
    rejects(
        &hs(&with(json!({"aud": ["gateway", 42]}))),
        JwtError::InvalidClaimType("aud"),
    );
    assert!(
        verifier()
            .verify_at(&hs(&with(json!({"aud": ["billing", "gateway"]}))), NOW)
            .is_ok()
    );
}

#[test]
fn subject_must_be_a_non_empty_string() {
    rejects(
        &hs(&with(json!({"sub": null}))),
        JwtError::MissingClaim("sub"),
    );
    rejects(
        &hs(&with(json!({"sub": ""}))),
        JwtError::MissingClaim("sub"),
    );
    rejects(
        &hs(&with(json!({"sub": 1001}))),
        JwtError::InvalidClaimType("sub"),
    );
}

#[test]
fn roles_must_be_strings() {
    rejects(
        &hs(&with(json!({"roles": "admin"}))),
        JwtError::InvalidClaimType("roles"),
    );
    rejects(
        &hs(&with(json!({"roles": ["admin", 1]}))),
        JwtError::InvalidClaimType("roles"),
    );
}

// ---------------------------------------------------------------- shape and size

#[test]
fn oversized_tokens_are_rejected_before_parsing() {
    let padding = "x".repeat(9_000);
    let token = hs(&with(json!({"pad": padding})));
    assert!(matches!(
        verifier().verify_at(&token, NOW),
        Err(JwtError::TooLarge { max: 8_192, .. })
    ));
}

#[test]
fn wrong_segment_counts_are_malformed() {
    let token = hs(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    for bad in [
        parts[..2].join("."),
        format!("{token}.extra"),
        String::new(),
        "abc".into(),
    ] {
        assert!(
            matches!(verifier().verify_at(&bad, NOW), Err(JwtError::Malformed(_))),
            "{bad:.40}"
        );
    }
}

#[test]
fn a_header_that_is_not_base64_or_json_is_malformed() {
    let body = b64(&claims());
    rejects(
        &format!("!!!.{body}.sig"),
        JwtError::Malformed("the header is not base64url"),
    );
    rejects(
        &format!("{}.{body}.sig", URL_SAFE_NO_PAD.encode("not json")),
        JwtError::Malformed("the header is not a JSON object"),
    );
    rejects(
        &format!("{}.{body}.sig", URL_SAFE_NO_PAD.encode("[1,2]")),
        JwtError::Malformed("the header is not a JSON object"),
    );
    rejects(
        &format!("{}.{body}.sig", b64(&json!({"kid": "hs"}))),
        JwtError::Malformed("the header has no alg"),
    );
    rejects(
        &format!("{}.{body}.sig", b64(&json!({"alg": 256, "kid": "hs"}))),
        JwtError::Malformed("alg is not a string"),
    );
}

#[test]
fn a_payload_that_is_not_an_object_is_malformed() {
    let header = json!({"alg": "HS256", "kid": "hs"});
    let token = raw_hs256(&header, &json!(["sub", "alice"]), SECRET);
    assert!(matches!(
        verifier().verify_at(&token, NOW),
        Err(JwtError::Malformed(_))
    ));
}

// ---------------------------------------------------------------- key configuration

#[test]
fn weak_hmac_secrets_and_duplicate_kids_are_refused() {
    assert!(
        KeySet::new()
            .with_key(VerifyingKey::hs256("k", b"short"))
            .is_err()
    );
    let set = KeySet::new()
        .with_key(VerifyingKey::hs256("k", SECRET))
        .unwrap();
    assert!(set.with_key(VerifyingKey::hs256("k", SECRET)).is_err());
    assert!(
        VerifyingKey::rs256_pem(
            "r",
            b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"
        )
        .is_err()
    );
}

#[test]
fn jwks_keys_are_pinned_by_their_alg() {
    let k = URL_SAFE_NO_PAD.encode(SECRET);
    let jwks = json!({"keys": [{"kty": "oct", "kid": "hs", "alg": "HS256", "k": k}]}).to_string();
    let v = JwtVerifier::new(KeySet::from_jwks(&jwks).unwrap(), JwtConfig::default());
    assert!(v.verify_at(&hs(&claims()), NOW).is_ok());
    let no_alg = json!({"keys": [{"kty": "oct", "kid": "hs", "k": k}]}).to_string();
    assert!(
        KeySet::from_jwks(&no_alg).is_err(),
        "a key without alg cannot be pinned"
    );
    let mismatched =
        json!({"keys": [{"kty": "oct", "kid": "hs", "alg": "RS256", "k": k}]}).to_string();
    assert!(
        KeySet::from_jwks(&mismatched).is_err(),
        "alg must match the key type"
    );
    let weak = json!({"keys": [{"kty": "oct", "kid": "hs", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(b"short")}]}).to_string();
    assert!(KeySet::from_jwks(&weak).is_err());
    assert!(KeySet::from_jwks("not json").is_err());
}

// ---------------------------------------------------------------- verified-token cache

#[test]
fn the_cache_skips_signatures_but_never_time_checks() {
    let cached = JwtVerifier::new(
        keys(),
        JwtConfig::default()
            .with_issuer("https://issuer.test")
            .with_audience("gateway"),
    )
    .with_cache(2);
    let token = sign(
        Algorithm::RS256,
        Some("rs"),
        &with(json!({"exp": NOW + 60, "nbf": NOW - 10})),
    );
    let first = cached.verify_at(&token, NOW).unwrap();
    assert_eq!(
        cached.verify_at(&token, NOW).unwrap(),
        first,
        "a hit returns the same claims"
    );
    // A hit past exp (plus leeway) is still expired.
    assert_eq!(cached.verify_at(&token, NOW + 91), Err(JwtError::Expired));
    // A different (tampered) token is never a hit.
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    bytes[3] ^= 1;
    assert_eq!(
        cached.verify_at(&format!("{input}.{}", URL_SAFE_NO_PAD.encode(bytes)), NOW),
        Err(JwtError::InvalidSignature)
    );
    // Rejected tokens are not cached; the cache stays within its capacity.
    for i in 0..10 {
        assert!(cached.verify_at(&hs(&with(json!({"jti": i}))), NOW).is_ok());
    }
    assert!(
        cached
            .verify_at(&hs(&with(json!({"exp": NOW - 100}))), NOW)
            .is_err()
    );
}

#[test]
fn the_cache_respects_nbf_on_hits() {
    let cached = JwtVerifier::new(keys(), JwtConfig::default().with_leeway_secs(0)).with_cache(16);
    let token = hs(&with(json!({"nbf": NOW, "iss": null, "aud": null})));
    assert!(cached.verify_at(&token, NOW).is_ok());
    assert_eq!(
        cached.verify_at(&token, NOW - 5),
        Err(JwtError::NotYetValid)
    );
}

/// Hits return the claims verified on the same thread (the same `Arc`);
/// another thread verifies once for itself; clones share the cache, and a
/// new verifier starts empty even where an old one's entries were.
#[test]
fn the_cache_is_per_thread_and_shared_by_clones() {
    use std::sync::Arc;
    let verifier =
        JwtVerifier::new(keys(), JwtConfig::default().with_leeway_secs(0)).with_cache(16);
    let token = hs(&with(json!({"iss": null, "aud": null})));
    let first = verifier.verify_shared_at(&token, NOW).unwrap();
    assert!(Arc::ptr_eq(
        &first,
        &verifier.verify_shared_at(&token, NOW).unwrap()
    ));
    let clone = verifier.clone();
    assert!(Arc::ptr_eq(
        &first,
        &clone.verify_shared_at(&token, NOW).unwrap()
    ));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (verifier, token) = (verifier.clone(), token.clone());
            std::thread::spawn(move || {
                let mine = verifier.verify_shared_at(&token, NOW).unwrap();
                for _ in 0..100 {
                    let again = verifier.verify_shared_at(&token, NOW).unwrap();
                    assert!(Arc::ptr_eq(&mine, &again), "a hit on this thread");
                }
                mine
            })
        })
        .collect();
    for thread in threads {
        let theirs = thread.join().unwrap();
        assert_eq!(*theirs, *first, "the same claims");
        assert!(!Arc::ptr_eq(&theirs, &first), "verified on that thread");
    }
    drop((verifier, clone));
    let fresh = JwtVerifier::new(keys(), JwtConfig::default().with_leeway_secs(0)).with_cache(16);
    let again = fresh.verify_shared_at(&token, NOW).unwrap();
    assert!(
        !Arc::ptr_eq(&again, &first),
        "no entry of the dropped verifier"
    );
    assert_eq!(*again, *first);
}
