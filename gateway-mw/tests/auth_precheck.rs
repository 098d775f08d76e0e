//! A token is refused before any signature work when its size, `alg` or
//! `kid` disqualifies it: the error variant says which check stopped it, and
//! each of these tokens carries a signature that would fail (or cost an RSA
//! verification) if it were ever checked. Together with the per-IP
//! failed-authentication limit this caps the CPU a client can spend on
//! forged RS256/ES256 tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gateway_mw::jwt::{JwtConfig, JwtError, JwtVerifier, KeySet, VerifyingKey};
use serde_json::json;

const SECRET: &[u8] = b"precheck-test-secret-0123456789abcdef";

fn b64(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A token with `header`, a plausible payload and a 256-byte "RSA
/// signature" of garbage.
fn forged(header: serde_json::Value) -> String {
    let payload = json!({"sub": "mallory", "exp": 4_000_000_000u64, "roles": ["admin"]});
    let signature = URL_SAFE_NO_PAD.encode([0x5a; 256]);
    format!("{}.{}.{signature}", b64(&header), b64(&payload))
}

fn verifier() -> JwtVerifier {
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("hs-key", SECRET))
        .unwrap();
    // As the gateway server builds it: with the verified-token cache.
    JwtVerifier::new(keys, JwtConfig::default()).with_cache(1_000)
}

#[test]
fn an_unknown_kid_is_refused_before_the_signature() {
    let token = forged(json!({"alg": "RS256", "kid": "no-such-key", "typ": "JWT"}));
    assert_eq!(verifier().verify(&token), Err(JwtError::UnknownKid));
    let token = forged(json!({"alg": "ES256", "kid": "no-such-key"}));
    assert_eq!(verifier().verify(&token), Err(JwtError::UnknownKid));
}

#[test]
fn an_unknown_or_unpinned_alg_is_refused_before_the_signature() {
    for alg in ["RS512", "PS256", "ES384", "HS512", "rs256"] {
        let token = forged(json!({"alg": alg, "kid": "hs-key"}));
        assert!(
            matches!(
                verifier().verify(&token),
                Err(JwtError::UnsupportedAlgorithm(_))
            ),
            "{alg}"
        );
    }
    // A known kid whose key is pinned to another algorithm.
    let token = forged(json!({"alg": "RS256", "kid": "hs-key"}));
    assert!(matches!(
        verifier().verify(&token),
        Err(JwtError::AlgorithmMismatch { .. })
    ));
    // No kid and no default key.
    let token = forged(json!({"alg": "RS256"}));
    assert_eq!(verifier().verify(&token), Err(JwtError::MissingKid));
}

#[test]
fn an_oversized_token_is_refused_unread() {
    // Valid structure, known kid and alg: only the size disqualifies it,
    // and it is refused before the header is even decoded.
    let header = json!({"alg": "HS256", "kid": "hs-key", "pad": "x".repeat(9_000)});
    let token = forged(header);
    assert!(matches!(
        verifier().verify(&token),
        Err(JwtError::TooLarge { max: 8_192, .. })
    ));
    let garbage = "%".repeat(8_193);
    assert!(matches!(
        verifier().verify(&garbage),
        Err(JwtError::TooLarge { .. })
    ));
}

#[test]
fn only_a_token_that_passes_every_precheck_reaches_the_signature() {
    // The control: same forgery, known kid and matching alg, so the
    // signature is checked and fails.
    let token = forged(json!({"alg": "HS256", "kid": "hs-key"}));
    assert_eq!(verifier().verify(&token), Err(JwtError::InvalidSignature));
}
