//! Errors keep their cause (`source()`) and expose a `kind()` to match on.

mod support;
use support::TempDir;

use std::error::Error as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_core::{
    Config, Error, ErrorKind, EventRef, ManualClock, MetricsProcessor, SnapshotError,
    SnapshotErrorKind,
};

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// A file with a valid header and checksum whose body does not decode.
fn undecodable() -> Vec<u8> {
    let body = [0xff_u8; 5];
    let mut bytes = b"FKMETSNP".to_vec();
    bytes.extend_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast_hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    bytes
}

/// CRC-32 (IEEE), bitwise: the test does not need the crate's dependency.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn snapshot_errors_keep_their_cause_and_expose_a_kind() {
    let dir = TempDir::new("errors");
    let path = dir.0.join("m.snapshot");
    let config = Config::default()
        .with_clock(ManualClock::new(start()))
        .with_snapshot_path(&path);

    std::fs::write(&path, undecodable()).unwrap();
    let err = MetricsProcessor::restore(config.clone()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Snapshot(SnapshotErrorKind::Corrupt));
    let Error::Snapshot { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(source.kind(), SnapshotErrorKind::Corrupt);
    assert!(
        source.source().is_some(),
        "the decoder's error was flattened into a string: {source:?}"
    );

    // An I/O failure keeps the io::Error, reachable through the chain.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let err = MetricsProcessor::restore(config.clone()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Snapshot(SnapshotErrorKind::Io));
    let io = err
        .source()
        .and_then(|s| s.source())
        .and_then(|s| s.downcast_ref::<std::io::Error>());
    assert!(io.is_some(), "{err:?}");
    assert!(matches!(
        err,
        Error::Snapshot {
            source: SnapshotError::Io(_),
            ..
        }
    ));

    // Rejections and other operations have kinds too.
    let p = MetricsProcessor::new(Config::default());
    assert_eq!(
        p.aggregates(0).unwrap_err().kind(),
        ErrorKind::InvalidWindow
    );
    let err = p
        .process(EventRef {
            timestamp: chrono::Utc::now(),
            user_id: "u",
            event_type: "t",
            value: f64::NAN,
        })
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Rejected(metrics_core::RejectReason::NonFiniteValue)
    );
}
