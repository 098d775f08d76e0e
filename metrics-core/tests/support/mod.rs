//! Helpers shared by metrics-core's integration tests.

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    /// A new, empty directory whose name contains `tag`.
    pub(crate) fn new(tag: &str) -> TempDir {
        use std::hash::{BuildHasher, RandomState};
        let nonce = RandomState::new().hash_one(std::time::Instant::now());
        let dir = std::env::temp_dir().join(format!(
            "metrics-core-{tag}-{}-{nonce:x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
