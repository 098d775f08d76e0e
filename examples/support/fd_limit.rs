//! Shared by the examples that hold many sockets.

/// Raises the open-file limit as far as allowed: both limits up to `target`
/// when the process may raise its hard limit (root), otherwise the soft limit
/// up to the hard one. Returns the soft limit now in force.
pub(crate) fn raise_fd_limit(target: u64) -> std::io::Result<u64> {
    if rlimit::setrlimit(rlimit::Resource::NOFILE, target, target).is_ok() {
        return Ok(target);
    }
    rlimit::increase_nofile_limit(target)
}
