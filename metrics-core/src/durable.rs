//! Durable whole-file replacement: what the snapshot writers use.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` so that readers (and a crash at any point) see
/// either the previous file or the complete new one.
///
/// The bytes go to a temporary file beside `path`, named uniquely for this
/// process and this call (`<name>.<pid>.<n>.tmp`), so concurrent writers of
/// the same path (a checkpoint and the shutdown writer) never truncate or
/// rename each other's file: the last rename wins and every rename finds its
/// own file. The file is synced, renamed into place, and then the directory
/// is synced so the rename itself survives a power loss. On error the
/// temporary file is removed.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = std::fs::File::create_new(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // Best effort: the error being reported is the write's, not this.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// Syncs the directory holding `path`, making a rename into it durable.
#[cfg(unix)]
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Directories cannot be opened for syncing here; a rename is as durable as
/// the platform makes it.
#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> std::io::Result<()> {
    Ok(())
}
